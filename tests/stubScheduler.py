"""The Ollama stub's scheduler: loaded runners, their runner options, parallel slots and the load queue.

Modelled on Ollama's `server/sched.go` (v0.12.10 and HEAD fb307609, see shared/reference/ollama-api.md §12):

- A loaded runner keeps the runner options it was loaded with (`api.Runner`: num_ctx, num_batch, num_gpu,
  main_gpu, use_mmap, num_thread). `getRunner`: a request whose options match is attached to the runner at once
  (`useLoadedRunner`), with no queue limit; any other request (model cold, or `needsReload`) goes to the pending
  queue (`pendingReqCh`, capacity OLLAMA_MAX_QUEUE) or is refused with 503 `server busy` when that queue is full.
- `processPending` handles one pending request at a time: a reload waits until every request attached to the old
  runner is done (its refcount drops to 0), then loads; everyone pending behind it waits too.
- A runner serves OLLAMA_NUM_PARALLEL requests at once (embedding models and some architectures such as mllama
  and qwen3vl one, `load`); the rest of the attached requests wait for a slot without limit and without a byte.
- num_ctx: unset -> OLLAMA_CONTEXT_LENGTH, else 4096 before v0.20 (envconfig) and by VRAM from v0.20
  (<24 GiB 4k, 24-48 GiB 32k, >=48 GiB 256k); at least 4, at least 2048 for vision models (`getRunner`); capped at
  the model's trained context length (`effectiveContext`).

Knobs (StubConfig): numParallel (0 = no slot limit, the old kind stub), maxQueue, loadDelayMs (every cold load and
reload), contextLength (OLLAMA_CONTEXT_LENGTH), vramGiB, version. Counters: loads, reloads (a load that replaced
a runner with other options), busy; events "load"/"reload" carry the old and new options.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import Any

RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread")
DEFAULT_RUNNER = {"num_batch": 512, "num_gpu": -1, "main_gpu": 0, "use_mmap": None, "num_thread": 0}
OLD_DEFAULT_NUM_CTX = 4096
SINGLE_SLOT_FAMILIES = frozenset({"mllama", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen3next", "lfm2",
                                  "lfm2moe", "nemotron_h", "nemotron_h_moe", "nemotron_h_omni"})
"""sched.go load (HEAD): architectures loaded with num_parallel 1 whatever OLLAMA_NUM_PARALLEL says."""


def runnerSlots(model: Any, numParallel: int) -> int:
    """sched.go load: embedding models (no completion capability) and some architectures get one slot."""
    if numParallel <= 0:
        return 0
    if not model.supports("completion") or model.family in SINGLE_SLOT_FAMILIES:
        return 1
    return numParallel


def versionTuple(text: str) -> tuple[int, int, int]:
    """"0.12.4" -> (0, 12, 4); pre-release tails ("-rc2") and junk parts count as 0."""
    parts = []
    for part in str(text).lstrip("v").split("-", 1)[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def defaultNumCtx(version: str, contextLength: int, vramGiB: float) -> int:
    """num_ctx when a request sets none (envconfig.ContextLength / HEAD routes.go VRAM tiers)."""
    if contextLength > 0:
        return contextLength
    if versionTuple(version) < (0, 20, 0):
        return OLD_DEFAULT_NUM_CTX
    return 4096 if vramGiB < 24 else 32768 if vramGiB < 48 else 262144


def runnerOptions(options: Any, trainContext: int, vision: bool, defaultCtx: int) -> dict[str, Any]:
    """The runner options a request would load with (what `needsReload` compares)."""
    options = options if isinstance(options, dict) else {}
    numCtx = options.get("num_ctx")
    numCtx = int(numCtx) if isinstance(numCtx, (int, float)) and not isinstance(numCtx, bool) else defaultCtx
    numCtx = max(numCtx, 4, 2048 if vision else 0)
    resolved = {"num_ctx": min(numCtx, trainContext) if trainContext > 0 else numCtx}
    for key, default in DEFAULT_RUNNER.items():
        resolved[key] = options.get(key, default)
    return resolved


def sameRunner(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """needsReload's comparison: num_gpu -1 on the request matches any layer count."""
    if wanted.get("num_gpu", -1) < 0:
        existing, wanted = {**existing, "num_gpu": -1}, {**wanted, "num_gpu": -1}
    return existing == wanted


class Runner:
    """One loaded model: its options, the requests attached to it (refs) and its parallel slots."""

    def __init__(self, name: str, options: dict[str, Any], expires: float, slots: int = 0) -> None:
        self.name = name
        self.slots = slots
        """Parallel requests this runner serves (0 = no limit, the kind stub)."""
        self.options = options
        self.expires = expires
        self.refs = 0
        self.busy = 0
        self.slotWaiters: collections.deque[asyncio.Future] = collections.deque()
        self.drained: asyncio.Event | None = None
        self.keepAlive = 300.0
        self.loadedAt = time.monotonic()

    @property
    def numCtx(self) -> int:
        return self.options["num_ctx"]


class Lease:
    """A request's hold on a runner: release() frees its slot and its reference (idempotent)."""

    def __init__(self, scheduler: Scheduler, runner: Runner, cold: bool, loadSeconds: float) -> None:
        self.scheduler, self.runner, self.cold, self.loadSeconds = scheduler, runner, cold, loadSeconds
        self.hasSlot = False
        self.released = False

    @property
    def numCtx(self) -> int:
        return self.runner.numCtx

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.scheduler.detach(self.runner, self.hasSlot)


class Scheduler:
    """Runners by model name, the pending (load) queue and the counters tests and benchmarks read."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.runners: dict[str, Runner] = {}
        self.loadLock = asyncio.Lock()
        self.pending = 0
        self.loads = self.reloads = self.busy = 0

    def reset(self) -> None:
        self.runners.clear()
        self.loadLock = asyncio.Lock()
        self.pending = 0
        self.loads = self.reloads = self.busy = 0

    def counters(self) -> dict[str, int]:
        return {"loads": self.loads, "reloads": self.reloads, "busy": self.busy, "pending": self.pending}

    def live(self, name: str) -> Runner | None:
        runner = self.runners.get(name)
        if runner is not None and runner.expires < time.monotonic() and runner.refs == 0:
            del self.runners[name]
            return None
        return runner

    def wantedOptions(self, model: Any, options: Any) -> dict[str, Any]:
        config = self.state.config
        defaultCtx = defaultNumCtx(config.version, config.contextLength, config.vramGiB)
        return runnerOptions(options, model.contextLength, model.supports("vision"), defaultCtx)

    def tryAcquire(self, model: Any, options: Any, keepAlive: float) -> Lease | None:
        """The fast path: a matching runner with a free slot (None = take the waiting path, acquire())."""
        runner = self.live(model.name)
        if runner is None or not sameRunner(runner.options, self.wantedOptions(model, options)):
            return None
        limit = runner.slots
        if limit > 0 and (runner.busy >= limit or runner.slotWaiters):
            return None
        lease = self._attach(runner, keepAlive, False, 0.0)
        runner.busy += 1
        lease.hasSlot = True
        return lease

    async def acquire(self, model: Any, options: Any, keepAlive: float) -> Lease | None:
        """Attach to a matching runner, or queue for a (re)load; None = load queue full (503 server busy)."""
        wanted = self.wantedOptions(model, options)
        runner = self.live(model.name)
        if runner is not None and sameRunner(runner.options, wanted):
            lease = self._attach(runner, keepAlive, False, 0.0)
        else:
            if self.loadLock.locked() and self.pending >= self.state.config.maxQueue:
                self.busy += 1
                return None
            lease = await self._loadQueued(model, wanted, keepAlive)
        try:
            await self._takeSlot(lease)
        except BaseException:
            lease.release()
            raise
        return lease

    async def _loadQueued(self, model: Any, wanted: dict[str, Any], keepAlive: float) -> Lease:
        self.pending += 1
        counted = True
        try:
            async with self.loadLock:
                self.pending -= 1
                counted = False
                return await self._loadLocked(model, wanted, keepAlive)
        finally:
            if counted:
                self.pending -= 1

    async def _loadLocked(self, model: Any, wanted: dict[str, Any], keepAlive: float) -> Lease:
        runner = self.live(model.name)
        if runner is not None and sameRunner(runner.options, wanted):
            return self._attach(runner, keepAlive, False, 0.0)
        if runner is not None:
            await self._drain(runner)
            self.runners.pop(model.name, None)
        started = time.monotonic()
        delay = max(self.state.config.loadDelayMs, self.state.config.slowLoadMs) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        self._countLoad(model.name, runner, wanted)
        fresh = Runner(model.name, wanted, math.inf, runnerSlots(model, self.state.config.numParallel))
        self.runners[model.name] = fresh
        return self._attach(fresh, keepAlive, True, time.monotonic() - started)

    def _countLoad(self, name: str, old: Runner | None, wanted: dict[str, Any]) -> None:
        self.loads += 1
        if old is not None:
            self.reloads += 1
            self.state.addEvent("reload", model=name, old=old.options, new=wanted)
        else:
            self.state.addEvent("runnerLoad", model=name, options=wanted)

    @staticmethod
    async def _drain(runner: Runner) -> None:
        """needsReload: the old runner is unloaded only when every request on it has finished."""
        while runner.refs > 0:
            runner.drained = asyncio.Event()
            await runner.drained.wait()

    def _attach(self, runner: Runner, keepAlive: float, cold: bool, loadSeconds: float) -> Lease:
        runner.refs += 1
        runner.expires = math.inf  # a runner in use never expires; the keep-alive counts from its last request
        runner.keepAlive = keepAlive
        return Lease(self, runner, cold, loadSeconds)

    async def _takeSlot(self, lease: Lease) -> None:
        runner, limit = lease.runner, lease.runner.slots
        if limit <= 0 or (runner.busy < limit and not runner.slotWaiters):
            runner.busy += 1
            lease.hasSlot = True
            return
        future = asyncio.get_running_loop().create_future()
        runner.slotWaiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future in runner.slotWaiters:
                runner.slotWaiters.remove(future)
            elif future.done() and not future.cancelled():
                lease.hasSlot = True  # the slot was handed over just before the cancel: release() returns it
            raise
        lease.hasSlot = True

    def detach(self, runner: Runner, hadSlot: bool) -> None:
        if hadSlot:
            self._handOverSlot(runner)
        runner.refs -= 1
        if runner.refs == 0:
            keepAlive = runner.keepAlive
            if keepAlive == 0 and self.runners.get(runner.name) is runner:
                del self.runners[runner.name]
            else:
                runner.expires = time.monotonic() + keepAlive
            if runner.drained is not None:
                runner.drained.set()

    @staticmethod
    def _handOverSlot(runner: Runner) -> None:
        while runner.slotWaiters:
            future = runner.slotWaiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        runner.busy = max(0, runner.busy - 1)

    def unload(self, name: str) -> None:
        """keep_alive 0 with no prompt: the runner goes as soon as nothing uses it."""
        runner = self.runners.get(name)
        if runner is None:
            return
        if runner.refs == 0:
            del self.runners[name]
        else:
            runner.keepAlive = 0

    def onRestart(self) -> None:
        self.reset()
