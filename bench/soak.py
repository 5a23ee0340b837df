"""``python -m bench.soak --minutes N``: drive the real service for N minutes with good requests, bad input and
Ollama faults, and check that every answer is one the service documents for the fault active when it was sent.

Starts the Ollama stub (``python -m tests.ollamaStub``, streams paced by a chunk delay) and the service
(``python app.py`` with a generated config.ini: fresh keys, ``[ollama] read_timeout`` 2 s, rate limits raised, a
2 MiB body limit) as processes, the service pinned to one core and the stub to the other (as ``make bench``). After a
warm-up, ``--concurrency`` workers send a seeded mix of request kinds, paced to ``--rate`` requests/s, while a
scheduler alternates quiet phases with faults: the stub's fault modes (POST /_stub/config: busy, hang,
slowFirstToken, midstreamError, truncate, malformedLine), the stub killed and kept down ("down"), and the stub killed
and started again at once on the same port ("restart", mid-load).

Every request is judged against the statuses acceptable for its kind and the condition it met (the phase when it was
sent; within ``--grace`` seconds of a switch either side's; "killed" while the stub died under it). Reported:
requests per kind and status, unexpected statuses with examples, requests held longer than read_timeout + margin,
p50/p99 of good requests outside faults, and the service's VmRSS after warm-up, every ``--rss-interval`` seconds and
at the end, with the growth over the second half. Afterwards a normal request must be answered and
poweron_requests_in_flight be back to zero. Exit status 1 on unexpected statuses, held requests or a failed final
check. Not run in CI; tests/test_soak.py runs a 15-second smoke of it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.procs import MIB, BenchProcess, freePort, rssBytesOf, treeRssBytes
from bench.streamProbe import percentile, runAsync
from tests.documentSamples import makeHeaderOnlyPdf, makeImage, makePdf

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
TEXT_MODEL, VISION_MODEL, EMBED_MODEL = "poweron-text-general", "poweron-vision-general", "poweron-embed"
UNKNOWN_MODEL = "poweron-does-not-exist"

NONE, DOWN, RESTART, KILLED = "none", "down", "restart", "killed"
STUB_FAULTS = ("busy", "hang", "slowFirstToken", "midstreamError", "truncate", "malformedLine")
FAULTS = (*STUB_FAULTS, DOWN, RESTART)
HELD = "held"
ERROR_FRAME = "200 error frame"

SLOW_FIRST_TOKEN_MS = 800
"""Below read_timeout: a slow first token must still be answered normally."""
HELD_MARGIN_SECONDS = 8.0
MAX_BODY_BYTES = 2 * MIB
OVERSIZED_BYTES = MAX_BODY_BYTES + MIB // 2
START_TIMEOUT_SECONDS = 60.0
RECOVERY_TIMEOUT_SECONDS = 20.0
EXAMPLE_LIMIT = 20
EXCERPT_CHARS = 300
STUB_CHUNKS = 8
LIMITED_RATE = "6/1/1"
"""The throttled key: 6 requests per minute, burst 1, one at a time."""


# ------------------------------------------------------------------------------------------------ options


@dataclass
class SoakOptions:
    minutes: float
    concurrency: int = 16
    seed: int = 1
    out: Path | None = None
    rate: float = 40.0
    phaseSeconds: float = 0.0
    grace: float = 2.5
    readTimeout: float = 2.0
    chunkDelayMs: float = 20.0
    warmupRounds: int = 2
    rssInterval: float = 30.0
    serviceCore: int = 0
    loadCore: int = 1
    pin: bool = True
    skip: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    @property
    def heldAfter(self) -> float:
        return self.readTimeout + HELD_MARGIN_SECONDS

    def phaseLength(self) -> float:
        """Seconds per fault phase (and per quiet phase between faults): 1/16 of the run, 5-30 s, unless given."""
        return self.phaseSeconds or min(30.0, max(5.0, self.seconds / 16.0))

    def kinds(self) -> tuple[Kind, ...]:
        return tuple(kind for kind in KINDS if kind.name not in self.skip)


def parseArgs(argv: list[str] | None) -> SoakOptions:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, required=True, help="length of the loaded run")
    parser.add_argument("--concurrency", type=int, default=16, help="workers sending requests (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix and the fault order")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default bench/results/soak-<date>.json)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second, all workers (default 40)")
    parser.add_argument("--phase-seconds", type=float, default=0.0, help="length of a fault phase (default auto)")
    parser.add_argument("--grace", type=float, default=2.5, help="seconds around a switch where both are fine")
    parser.add_argument("--read-timeout", type=float, default=2.0, help="the service's [ollama] read_timeout")
    parser.add_argument("--chunk-delay-ms", type=float, default=20.0, help="the stub's delay between chunks")
    parser.add_argument("--rss-interval", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument("--service-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1, help="core of the stub and the load driver")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--skip", default="", help="comma-separated request kinds not to send")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.rate <= 0:
        parser.error("--minutes, --concurrency and --rate must be positive")
    skip = tuple(name.strip() for name in args.skip.split(",") if name.strip())
    if unknown := [name for name in skip if name not in KIND_BY_NAME]:
        parser.error(f"--skip: unknown kinds {', '.join(unknown)}; known: {', '.join(KIND_BY_NAME)}")
    return SoakOptions(minutes=args.minutes, concurrency=args.concurrency, seed=args.seed, out=args.out,
                       rate=args.rate, phaseSeconds=args.phase_seconds, grace=args.grace,
                       readTimeout=args.read_timeout, chunkDelayMs=args.chunk_delay_ms,
                       rssInterval=args.rss_interval, serviceCore=args.service_core, loadCore=args.load_core,
                       pin=not args.no_pin and (os.cpu_count() or 1) > max(args.service_core, args.load_core),
                       skip=skip)


# ------------------------------------------------------------------------------- expected outcomes


def _table(**outcomes: set[str]) -> dict[str, frozenset[str]]:
    return {condition: frozenset(values) for condition, values in outcomes.items()}


MODEL_CALL = _table(none={"200"}, slowFirstToken={"200"}, busy={"503"}, hang={"504"}, midstreamError={"502"},
                    truncate={"502"}, malformedLine={"502"}, down={"503"}, killed={"200", "502", "503"})
"""A non-streaming request that calls Ollama once: busy/down -> 503, hang -> 504, broken answers -> 502."""
MODEL_STREAM = {**MODEL_CALL, "midstreamError": frozenset({ERROR_FRAME}), "truncate": frozenset({ERROR_FRAME}),
                "malformedLine": frozenset({ERROR_FRAME}), KILLED: frozenset({"200", ERROR_FRAME, "502", "503"})}
"""A stream: failures after the first line become an error frame and [DONE] after the 200."""


def _always(*outcomes: str) -> dict[str, frozenset[str]]:
    return {"*": frozenset(outcomes)}


def acceptable(table: dict[str, frozenset[str]], condition: str) -> frozenset[str]:
    return table.get(condition, table.get("*", frozenset()))


# ------------------------------------------------------------------------------------ request kinds


@dataclass(frozen=True)
class Keys:
    """The generated keys of a run."""

    api: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    openAi: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    limited: str = field(default_factory=lambda: secrets.token_urlsafe(24))


class Payloads:
    """Request bodies and headers, built once."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.png = makeImage(64, 48)
        self.pdf = makePdf(2)
        self.corruptPdf = makeHeaderOnlyPdf()
        self.oversized = orjson.dumps({"model": TEXT_MODEL, "messages": [{"role": "user",
                                                                          "content": "x" * OVERSIZED_BYTES}]})

    def bearer(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.keys.openAi}"}

    def apiKey(self) -> dict[str, str]:
        return {"X-API-Key": self.keys.api}

    def chat(self, stream: bool, model: str = TEXT_MODEL) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello to the soak."}], "max_tokens": 64}
        return {"json": {**body, "stream": True} if stream else body, "headers": self.bearer()}

    def analyze(self, data: bytes, name: str) -> dict[str, Any]:
        return {"files": {"file": (name, data)}, "data": {"prompt": "What is the total?"}, "headers": self.apiKey()}


Build = Callable[[Payloads], tuple[str, str, dict[str, Any]]]
Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Kind:
    """One kind of request: how to send it, how often, what a 200 body must hold, which outcomes are fine."""

    name: str
    weight: int
    good: bool
    build: Build
    table: dict[str, frozenset[str]]
    check: Check = lambda body: True
    stream: bool = False


def _chatOk(body: Any) -> bool:
    return bool(body["choices"][0]["message"]["content"])


def _embeddingsOk(body: Any) -> bool:
    return len(body["data"]) == 2 and len(body["data"][0]["embedding"]) > 0


def _apiEmbedOk(body: Any) -> bool:
    return len(body["embeddings"]) == 2 and len(body["embeddings"][0]) > 0


def _modelsOk(body: Any) -> bool:
    return isinstance(body["data"], list)


def _answerOk(body: Any) -> bool:
    return bool(body["answer"])


def goodKinds() -> tuple[Kind, ...]:
    return (
        Kind("chatStream", 20, True, lambda p: ("POST", "/v1/chat/completions", p.chat(True)), MODEL_STREAM,
             stream=True),
        Kind("chat", 14, True, lambda p: ("POST", "/v1/chat/completions", p.chat(False)), MODEL_CALL, _chatOk),
        Kind("embeddings", 8, True, lambda p: ("POST", "/v1/embeddings", {
            "json": {"model": EMBED_MODEL, "input": ["soak one", "soak two"]}, "headers": p.bearer()}),
             MODEL_CALL, _embeddingsOk),
        Kind("models", 5, True, lambda p: ("GET", "/v1/models", {"headers": p.bearer()}), _always("200"), _modelsOk),
        Kind("analyzePng", 6, True, lambda p: ("POST", "/api/analyze", p.analyze(p.png, "scan.png")), MODEL_CALL,
             _answerOk),
        Kind("analyzePdf", 5, True, lambda p: ("POST", "/api/analyze", p.analyze(p.pdf, "invoice.pdf")), MODEL_CALL,
             _answerOk),
        Kind("apiText", 8, True, lambda p: ("POST", "/api/text", {
            "json": {"prompt": "Summarise.", "text": "The soak test sends this text."}, "headers": p.apiKey()}),
             MODEL_CALL, _answerOk),
        Kind("apiEmbed", 6, True, lambda p: ("POST", "/api/embed", {
            "json": {"texts": ["Rechnung 2024-17", "Mahnung"]}, "headers": p.apiKey()}), MODEL_CALL, _apiEmbedOk),
    )


def badKinds() -> tuple[Kind, ...]:
    malformed = b'{"model": "poweron-text-general", "messages": [{'
    return (
        Kind("wrongKey", 3, False, lambda p: ("POST", "/v1/chat/completions", {
            **p.chat(False), "headers": p.bearer("wrong-" + p.keys.openAi)}), _always("401")),
        Kind("missingKey", 3, False, lambda p: ("POST", "/api/embed", {"json": {"texts": ["x"]}}), _always("401")),
        Kind("malformedJson", 3, False, lambda p: ("POST", "/v1/chat/completions", {
            "content": malformed, "headers": {**p.bearer(), "Content-Type": "application/json"}}), _always("400")),
        Kind("malformedJsonApi", 2, False, lambda p: ("POST", "/api/text", {
            "content": b'{"prompt": ', "headers": {**p.apiKey(), "Content-Type": "application/json"}}),
             _always("400")),
        Kind("unknownModel", 3, False, lambda p: ("POST", "/v1/chat/completions", p.chat(False, UNKNOWN_MODEL)),
             _always("404")),
        Kind("oversized", 1, False, lambda p: ("POST", "/v1/chat/completions", {
            "content": p.oversized, "headers": {**p.bearer(), "Content-Type": "application/json"}}), _always("413")),
        # no Ollama call: 503 once the registry has seen Ollama go (it checks every discovery_ttl), 422 before
        Kind("corruptPdf", 2, False, lambda p: ("POST", "/api/analyze", p.analyze(p.corruptPdf, "broken.pdf")),
             {"*": frozenset({"422"}), DOWN: frozenset({"422", "503"}), KILLED: frozenset({"422", "503"})}),
        Kind("wrongContentType", 2, False, lambda p: ("POST", "/api/analyze", {
            "content": b"prompt=hello", "headers": {**p.apiKey(), "Content-Type": "text/plain"}}), _always("415")),
        Kind("throttled", 2, False, lambda p: ("GET", "/v1/models", {"headers": p.bearer(p.keys.limited)}),
             _always("200", "429"), _modelsOk),
    )


KINDS = goodKinds() + badKinds()
KIND_BY_NAME = {kind.name: kind for kind in KINDS}


# --------------------------------------------------------------------------------- judging answers


def excerpt(body: bytes) -> str:
    return body[:EXCERPT_CHARS].decode("utf-8", "replace")


def _errorBodyOk(path: str, body: Any) -> bool:
    if path.startswith("/v1/"):
        return isinstance(body["error"]["message"], str) and bool(body["error"]["message"])
    return isinstance(body["detail"], str) and isinstance(body["code"], str)


def bodyProblem(kind: Kind, path: str, status: int, headers: httpx.Headers, raw: bytes) -> str:
    """What is wrong with an answer's body or headers ('' when nothing): the documented shapes only."""
    try:
        body = orjson.loads(raw)
        shapeOk = kind.check(body) if status == 200 else _errorBodyOk(path, body) if status >= 400 else True
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        shapeOk = False
    if not shapeOk:
        return "bad body" if status == 200 else "bad error body"
    if status in (429, 503) and "retry-after" not in headers:
        return "no Retry-After"
    return ""


def sseOutcome(lines: list[str]) -> str:
    """The outcome of a 200 stream from its ``data:`` lines: clean, error frame, cut (no [DONE]) or empty."""
    payloads = [line[5:].strip() for line in lines if line.startswith("data:")]
    if not payloads or payloads[-1] != "[DONE]":
        return "200 cut"
    try:
        frames = [orjson.loads(payload) for payload in payloads[:-1]]
        errors = [frame["error"] for frame in frames if "error" in frame]
        if errors:
            return ERROR_FRAME if all(isinstance(error["message"], str) for error in errors) else "200 bad error frame"
        content = any(choice["delta"].get("content") for frame in frames for choice in frame["choices"])
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "200 bad frame"
    return "200" if content else "200 empty"


async def perform(client: httpx.AsyncClient, kind: Kind, payloads: Payloads) -> tuple[str, str]:
    """Send one request of ``kind``; its outcome (status plus what was wrong) and the start of its body."""
    method, path, kwargs = kind.build(payloads)
    response = await client.send(client.build_request(method, path, **kwargs), stream=True)
    try:
        if kind.stream and response.status_code == 200:
            lines = [line async for line in response.aiter_lines()]
            isSse = response.headers.get("content-type", "").startswith("text/event-stream")
            return (sseOutcome(lines) if isSse else "200 not SSE"), "\n".join(lines)[-EXCERPT_CHARS:]
        raw = await response.aread()
    finally:
        await response.aclose()
    problem = bodyProblem(kind, path, response.status_code, response.headers, raw)
    return f"{response.status_code} {problem}".strip(), excerpt(raw)


# ------------------------------------------------------------------------------- timeline of faults


class Timeline:
    """When which condition was active (switch times in seconds since the start) and when the stub was killed."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.times: list[float] = [float("-inf")]
        self.conditions: list[str] = [NONE]
        self.kills: list[float] = []

    def switch(self, at: float, condition: str) -> None:
        self.times.append(at)
        self.conditions.append(condition)

    def kill(self, at: float) -> None:
        self.kills.append(at)

    def conditionAt(self, at: float) -> str:
        return self.conditions[bisect.bisect_right(self.times, at) - 1]

    def conditionsFor(self, sentAt: float, endedAt: float) -> frozenset[str]:
        """Every condition active within ``grace`` of the send time, plus "killed" when the stub died under it."""
        first = bisect.bisect_right(self.times, sentAt - self.grace) - 1
        last = bisect.bisect_right(self.times, sentAt + self.grace)
        found = set(self.conditions[first:last])
        if any(sentAt - self.grace <= at <= endedAt + self.grace for at in self.kills):
            found.add(KILLED)
        return frozenset(found)

    def phases(self, end: float) -> list[dict[str, Any]]:
        bounds = self.times[1:] + [end]
        return [{"condition": condition, "startSeconds": round(max(start, 0.0), 2), "endSeconds": round(stop, 2)}
                for condition, start, stop in zip(self.conditions, self.times, bounds) if stop > max(start, 0.0)]


def faultOrder(rng: random.Random) -> Iterator[str]:
    """Every fault once in a shuffled order, again and again."""
    while True:
        order = list(FAULTS)
        rng.shuffle(order)
        yield from order


# --------------------------------------------------------------------------------------- processes


def serviceIni(port: int, stubPort: int, keys: Keys, readTimeout: float) -> str:
    """The soak's config: generated keys, short read timeout, limits far above the load but for the throttled key."""
    return (f"[server]\nhost = 127.0.0.1\nport = {port}\nlog_level = warning\ngraceful_shutdown_seconds = 2\n\n"
            f"[ollama]\nbase_url = http://127.0.0.1:{stubPort}\nconnect_timeout = 1\nread_timeout = {readTimeout}\n"
            f"discovery_ttl = 2\nnum_parallel = 100000\nmax_queue = 100000\n\n"
            f"[auth]\napi_keys = gateway={keys.api}\nopenai_keys = soak={keys.openAi}, limited={keys.limited}\n\n"
            f"[ratelimit]\nper_key = gateway=10000000/100000/10000, soak=10000000/100000/10000, "
            f"limited={LIMITED_RATE}\n\n"
            f"[limits]\nmax_body_bytes = {MAX_BODY_BYTES}\n\n"
            f"[documents]\nrender_workers = 1\nprestart_workers = true\nrender_timeout_seconds = 10\n\n"
            f"[whisper]\nenabled = false\n\n[warmup]\nmodels =\n\n[metrics]\nenabled = true\n")


class UnpinnedProcess(BenchProcess):
    """A BenchProcess started without taskset."""

    def start(self) -> UnpinnedProcess:
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self


class Processes:
    """The stub and the service of one run, with their logs in a work directory."""

    def __init__(self, options: SoakOptions, workDir: Path, keys: Keys) -> None:
        self.options, self.workDir, self.keys = options, workDir, keys
        self.stubPort, self.servicePort = freePort(), freePort()
        self.stub = self._process("stub", [sys.executable, "-m", "tests.ollamaStub", "--port", str(self.stubPort),
                                           "--no-record", "--kind", "--chunks", str(STUB_CHUNKS),
                                           "--chunk-delay-ms", str(options.chunkDelayMs)], dict(os.environ),
                                  options.loadCore)
        iniPath = workDir / "service.ini"
        iniPath.write_text(serviceIni(self.servicePort, self.stubPort, keys, options.readTimeout), encoding="utf-8")
        env = {key: value for key, value in os.environ.items() if not key.startswith("PRIVATE_LLM_")}
        self.service = self._process("service", [sys.executable, "app.py"], {**env, "PRIVATE_LLM_CONFIG": str(iniPath)},
                                     options.serviceCore)

    def _process(self, name: str, command: list[str], env: dict[str, str], core: int) -> BenchProcess:
        if not self.options.pin:
            return UnpinnedProcess(name, command, env, core, self.workDir / f"{name}.log", REPO_ROOT)
        return BenchProcess(name, command, env, core, self.workDir / f"{name}.log", REPO_ROOT)

    @property
    def serviceUrl(self) -> str:
        return f"http://127.0.0.1:{self.servicePort}"

    @property
    def stubUrl(self) -> str:
        return f"http://127.0.0.1:{self.stubPort}"

    def startStub(self) -> None:
        self.stub.start().waitForHttp(self.stubUrl + "/api/version", START_TIMEOUT_SECONDS)

    def killStub(self) -> None:
        """SIGKILL, as a crash: no graceful end for the open connections."""
        if self.stub.alive():
            os.killpg(self.stub.pid, signal.SIGKILL)
            self.stub.process.wait()

    def start(self) -> None:
        self.startStub()
        self.service.start().waitForHttp(self.serviceUrl + "/health/liveliness", START_TIMEOUT_SECONDS)

    def stop(self) -> None:
        self.service.stop()
        self.stub.stop()


# ------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True, slots=True)
class Record:
    kind: str
    sentAt: float
    endedAt: float
    outcome: str
    body: str


class Pacer:
    """Send slots at a fixed rate shared by all workers; a slot missed while every worker was busy is dropped."""

    def __init__(self, rate: float, start: float) -> None:
        self.interval, self.nextAt = 1.0 / rate, start

    def slot(self) -> float:
        at = max(self.nextAt, time.monotonic())
        self.nextAt = at + self.interval
        return at


class SoakRun:
    """The loaded part of a run: workers, the fault scheduler, the RSS sampler and what they recorded."""

    def __init__(self, options: SoakOptions, processes: Processes, payloads: Payloads) -> None:
        self.options, self.processes, self.payloads = options, processes, payloads
        self.timeline = Timeline(options.grace)
        self.records: list[Record] = []
        self.rssSamples: list[dict[str, Any]] = []
        self.startedAt = 0.0
        self.faultsApplied: Counter[str] = Counter()
        self.stopping = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.startedAt

    async def run(self, client: httpx.AsyncClient, stubClient: httpx.AsyncClient) -> float:
        """Load for the configured time; returns the seconds the load ran (until the last answer)."""
        self.startedAt = time.monotonic()
        deadline = self.startedAt + self.options.seconds
        self.sampleRss()
        pacer = Pacer(self.options.rate, self.startedAt)
        sampler = asyncio.create_task(self.sampleRssEvery(self.options.rssInterval))
        schedule = asyncio.create_task(self.schedule(stubClient, deadline))
        workers = [self.worker(client, pacer, random.Random(self.options.seed * 1000 + index), deadline)
                   for index in range(self.options.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            self.stopping.set()
            await schedule
            sampler.cancel()
        loadSeconds = self.now()
        self.sampleRss()
        return loadSeconds

    async def worker(self, client: httpx.AsyncClient, pacer: Pacer, rng: random.Random, deadline: float) -> None:
        kinds = self.options.kinds()
        weights = [kind.weight for kind in kinds]
        while (at := pacer.slot()) < deadline:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            kind = rng.choices(kinds, weights)[0]
            self.records.append(await self.send(client, kind))

    async def send(self, client: httpx.AsyncClient, kind: Kind) -> Record:
        sentAt = self.now()
        try:
            outcome, body = await asyncio.wait_for(perform(client, kind, self.payloads), self.options.heldAfter)
        except asyncio.TimeoutError:
            outcome, body = HELD, ""
        except httpx.HTTPError as exc:
            outcome, body = f"transport {type(exc).__name__}", str(exc)[:EXCERPT_CHARS]
        return Record(kind.name, sentAt, self.now(), outcome, body)

    # ------------------------------------------------------------------------------ faults

    async def schedule(self, stubClient: httpx.AsyncClient, deadline: float) -> None:
        """Quiet phase, fault phase, quiet phase, ... until the deadline (faults in a seeded order); a fault under
        way when the run stops is ended properly (stub up again, no fault set)."""
        phase = self.options.phaseLength()
        for fault in faultOrder(random.Random(self.options.seed)):
            await self.pause(min(phase, max(0.0, deadline - time.monotonic())))
            if self.stopping.is_set() or time.monotonic() + phase / 2 >= deadline:
                return
            await self.applyFault(stubClient, fault, phase)

    async def pause(self, seconds: float) -> None:
        """Sleep, but no longer once the run stops."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def applyFault(self, stubClient: httpx.AsyncClient, fault: str, phase: float) -> None:
        """One fault phase: a stub fault for ``phase`` seconds, the stub down for ``phase`` seconds, or a restart."""
        self.faultsApplied[fault] += 1
        if fault in STUB_FAULTS:
            await self.setStubFault(stubClient, fault)
            await self.pause(phase)
            await self.setStubFault(stubClient, None)
        else:
            await self.killStub()
            await self.pause(phase if fault == DOWN else 0.0)
            await self.startStub()

    async def setStubFault(self, stubClient: httpx.AsyncClient, fault: str | None) -> None:
        config = {"fault": fault, "faultDelayMs": SLOW_FIRST_TOKEN_MS} if fault else {"fault": None}
        response = await stubClient.post("/_stub/config", json=config)
        response.raise_for_status()
        self.timeline.switch(self.now(), fault or NONE)

    async def killStub(self) -> None:
        at = self.now()
        self.timeline.kill(at)
        self.timeline.switch(at, DOWN)
        await asyncio.to_thread(self.processes.killStub)

    async def startStub(self) -> None:
        await asyncio.to_thread(self.processes.startStub)
        self.timeline.switch(self.now(), NONE)

    # --------------------------------------------------------------------------------- RSS

    def sampleRss(self) -> None:
        pid = self.processes.service.pid
        self.rssSamples.append({"atSeconds": round(self.now(), 1), "bytes": rssBytesOf(pid),
                                "treeBytes": treeRssBytes(pid)})

    async def sampleRssEvery(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sampleRss()


# ---------------------------------------------------------------------------------------- checks


async def warmUp(client: httpx.AsyncClient, payloads: Payloads, rounds: int) -> None:
    """Every good kind a few times without faults; all must succeed, or the run would judge a broken set-up."""
    for _ in range(rounds):
        for kind in goodKinds():
            outcome, body = await perform(client, kind, payloads)
            if outcome != "200":
                raise RuntimeError(f"warm-up: {kind.name} answered {outcome}: {body}")


async def untilNormal(client: httpx.AsyncClient, payloads: Payloads) -> str:
    """The outcome of a normal chat once the service answers it (or the last one after the recovery timeout)."""
    deadline, outcome = time.monotonic() + RECOVERY_TIMEOUT_SECONDS, ""
    kind = KIND_BY_NAME["chat"]
    while time.monotonic() < deadline:
        try:
            outcome, _ = await perform(client, kind, payloads)
        except httpx.HTTPError as exc:
            outcome = f"transport {type(exc).__name__}"
        if outcome == "200":
            break
        await asyncio.sleep(0.5)
    return outcome


def inFlightOf(metricsText: str) -> float | None:
    for line in metricsText.splitlines():
        if line.startswith("poweron_requests_in_flight "):
            return float(line.split()[1])
    return None


async def inFlightBesidesScrape(client: httpx.AsyncClient, payloads: Payloads) -> int | None:
    """poweron_requests_in_flight minus the scrape itself, polled until it is 0 (or RECOVERY_TIMEOUT_SECONDS)."""
    deadline, value = time.monotonic() + RECOVERY_TIMEOUT_SECONDS, None
    while time.monotonic() < deadline:
        response = await client.get("/metrics", headers=payloads.bearer())
        gauge = inFlightOf(response.text) if response.status_code == 200 else None
        value = None if gauge is None else round(gauge) - 1
        if value == 0:
            break
        await asyncio.sleep(0.5)
    return value


async def finalCheck(client: httpx.AsyncClient, payloads: Payloads, processes: Processes) -> dict[str, Any]:
    normal = await untilNormal(client, payloads)
    inFlight = await inFlightBesidesScrape(client, payloads)
    alive = processes.service.alive()
    return {"normalRequest": normal, "inFlight": inFlight, "serviceAlive": alive,
            "ok": normal == "200" and inFlight == 0 and alive}


# ---------------------------------------------------------------------------------------- report


def judge(record: Record, timeline: Timeline) -> tuple[frozenset[str], frozenset[str]]:
    """The conditions a request met and the outcomes acceptable for them."""
    conditions = timeline.conditionsFor(record.sentAt, record.endedAt)
    table = KIND_BY_NAME[record.kind].table
    return conditions, frozenset().union(*(acceptable(table, condition) for condition in conditions))


def latencySummary(values: list[float]) -> dict[str, Any]:
    return {"count": len(values), "p50Ms": round(percentile(values, 50), 2), "p99Ms": round(percentile(values, 99), 2)}


def rssSummary(samples: list[dict[str, Any]], loadSeconds: float) -> dict[str, Any]:
    """Start, end, peak and the growth from the middle of the run to its end (a leak keeps growing there)."""
    middle = [s for s in samples if s["atSeconds"] <= loadSeconds / 2][-1]
    start, end = samples[0], samples[-1]
    return {"startBytes": start["bytes"], "endBytes": end["bytes"], "peakBytes": max(s["bytes"] for s in samples),
            "middleBytes": middle["bytes"], "middleAtSeconds": middle["atSeconds"],
            "secondHalfGrowthBytes": end["bytes"] - middle["bytes"], "growthBytes": end["bytes"] - start["bytes"],
            "samples": samples}


def buildReport(run: SoakRun, loadSeconds: float, final: dict[str, Any], options: SoakOptions) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    perKind: dict[str, Counter[str]] = {kind.name: Counter() for kind in KINDS}
    unexpected: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {kind.name: [] for kind in goodKinds()}
    perCondition: dict[str, Counter[str]] = {}
    for record in run.records:
        conditions, fine = judge(record, run.timeline)
        statuses[record.outcome] += 1
        perKind[record.kind][record.outcome] += 1
        if KIND_BY_NAME[record.kind].good and "*" not in KIND_BY_NAME[record.kind].table:  # calls Ollama
            bucket = next(iter(conditions)) if len(conditions) == 1 else "transition"
            perCondition.setdefault(bucket, Counter())[record.outcome] += 1
        example = {"kind": record.kind, "outcome": record.outcome, "expected": sorted(fine),
                   "conditions": sorted(conditions), "sentAtSeconds": round(record.sentAt, 2),
                   "latencyMs": round((record.endedAt - record.sentAt) * 1000, 1), "body": record.body}
        if record.outcome == HELD:
            held.append(example)
        elif record.outcome not in fine:
            unexpected.append(example)
        elif conditions == {NONE} and record.kind in latencies:
            latencies[record.kind].append((record.endedAt - record.sentAt) * 1000.0)
    allGood = [value for values in latencies.values() for value in values]
    ok = not unexpected and not held and final["ok"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "options": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()},
        "loadSeconds": round(loadSeconds, 1), "heldAfterSeconds": options.heldAfter,
        "requests": len(run.records), "good": sum(1 for r in run.records if KIND_BY_NAME[r.kind].good),
        "perKind": {name: {"count": sum(c.values()), "statuses": dict(c.most_common())} for name, c in perKind.items()},
        "statuses": dict(statuses.most_common()),
        "goodByCondition": {name: dict(c.most_common()) for name, c in perCondition.items()},
        "unexpected": {"count": len(unexpected), "examples": unexpected[:EXAMPLE_LIMIT]},
        "held": {"count": len(held), "examples": held[:EXAMPLE_LIMIT]},
        "latencyNoFault": {"all": latencySummary(allGood),
                           "perKind": {name: latencySummary(values) for name, values in latencies.items()}},
        "faults": dict(run.faultsApplied), "stubKills": len(run.timeline.kills),
        "phases": run.timeline.phases(loadSeconds),
        "rss": rssSummary(run.rssSamples, loadSeconds), "finalCheck": final, "ok": ok,
    }


def mib(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def signedMib(value: float) -> str:
    return f"{value / MIB:+.2f} MiB"


def summaryLines(report: dict[str, Any]) -> list[str]:
    options, rss, final = report["options"], report["rss"], report["finalCheck"]
    latency = report["latencyNoFault"]["all"]
    lines = [f"Soak: {report['loadSeconds']:g} s, concurrency {options['concurrency']}, rate {options['rate']:g}/s, "
             f"seed {options['seed']}, read_timeout {options['readTimeout']:g} s",
             f"Requests: {report['requests']} ({report['good']} good, {report['requests'] - report['good']} bad input)",
             "Faults: " + (", ".join(f"{name} x{count}" for name, count in report["faults"].items()) or "none")
             + f"; stub killed {report['stubKills']}x",
             "Statuses: " + ", ".join(f"{outcome}: {count}" for outcome, count in report["statuses"].items())]
    lines.append("Good requests that call Ollama, by the condition when sent:")
    for name, counts in report["goodByCondition"].items():
        lines.append(f"  {name:<17} " + ", ".join(f"{outcome}: {count}" for outcome, count in counts.items()))
    lines.append("Per kind:")
    for name, entry in report["perKind"].items():
        counts = ", ".join(f"{outcome}: {count}" for outcome, count in entry["statuses"].items())
        lines.append(f"  {name:<17} {entry['count']:>6}  {counts}")
    lines.append(f"Unexpected: {report['unexpected']['count']}")
    lines += [f"  {e['kind']} -> {e['outcome']} (expected {'/'.join(e['expected'])}; {'+'.join(e['conditions'])} "
              f"at {e['sentAtSeconds']} s): {e['body'][:160]!r}" for e in report["unexpected"]["examples"][:8]]
    lines.append(f"Held longer than {report['heldAfterSeconds']:g} s: {report['held']['count']}")
    lines.append(f"Good requests outside faults: p50 {latency['p50Ms']} ms, p99 {latency['p99Ms']} ms "
                 f"(n={latency['count']}); " + ", ".join(
                     f"{name} {entry['p50Ms']}/{entry['p99Ms']} ms"
                     for name, entry in report["latencyNoFault"]["perKind"].items() if entry["count"]))
    samples = ", ".join(f"{sample['atSeconds']:g} s {mib(sample['bytes'])}" for sample in rss["samples"])
    lines.append(f"Service RSS: start {mib(rss['startBytes'])}, end {mib(rss['endBytes'])}, "
                 f"peak {mib(rss['peakBytes'])}; second half {signedMib(rss['secondHalfGrowthBytes'])} "
                 f"(from {rss['middleAtSeconds']:g} s); samples {samples}")
    lines.append(f"After the run: normal chat -> {final['normalRequest']}, in flight besides the scrape: "
                 f"{final['inFlight']}, service alive: {final['serviceAlive']}")
    lines.append("Result: " + ("OK" if report["ok"] else "FAILED"))
    return lines


# ------------------------------------------------------------------------------------------ main


def defaultOut() -> Path:
    return RESULTS_DIR / f"soak-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def clientFor(baseUrl: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=baseUrl, timeout=httpx.Timeout(None), limits=limits, trust_env=False)


async def soak(options: SoakOptions, processes: Processes, payloads: Payloads) -> dict[str, Any]:
    run = SoakRun(options, processes, payloads)
    async with clientFor(processes.serviceUrl, options.concurrency * 2 + 8) as client, \
            clientFor(processes.stubUrl, 4) as stubClient:
        await warmUp(client, payloads, options.warmupRounds)
        loadSeconds = await run.run(client, stubClient)
        final = await finalCheck(client, payloads, processes)
    return buildReport(run, loadSeconds, final, options)


def main(argv: list[str] | None = None) -> int:
    options = parseArgs(argv)
    out = options.out or defaultOut()
    workDir = Path(tempfile.mkdtemp(prefix="soak-"))
    keys = Keys()
    processes = Processes(options, workDir, keys)
    if options.pin:
        os.sched_setaffinity(0, {options.loadCore})
    try:
        processes.start()
        report = runAsync(soak(options, processes, Payloads(keys)))
    finally:
        processes.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print("\n".join(summaryLines(report)))
    print(f"JSON: {out}")
    if report["ok"]:
        shutil.rmtree(workDir, ignore_errors=True)
    else:
        print(f"Logs: {workDir}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
