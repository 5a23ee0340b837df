"""Admission control in front of Ollama: per (upstream, model) at most as many requests in flight as Ollama has
slots for that model, the rest waiting here in a bounded queue served fairly across key names.

Why: Ollama runs ``OLLAMA_NUM_PARALLEL`` requests per loaded model (embedding models always 1: server/sched.go
forces ``numParallel = 1`` for models without the completion capability) and lets every further request for a
loaded model wait without limit, sending no byte. Here the wait is bounded, visible and fair.

Interface (one ``Admission`` per app, on ``app.state.admission``; ``upstream`` is ``"default"`` for the one
``[ollama] base_url``, a router over several upstreams calls it per upstream)::

    async with admission.slot(upstream, model, keyName, kind) as ticket:   # kind: "generate" | "embed"
        ...call Ollama...                      # ticket.queueSeconds: time spent waiting

    ticket = admission.enqueue(upstream, model, keyName, kind)   # no waiting: admitted or queued
    while not ticket.admitted: ...ticket.position()...           # e.g. tell a stream's client its place
    await admission.wait(ticket); ...; ticket.release()

``enqueue``/``slot`` raise ``AdmissionRefused`` (a 503 ServiceError with ``Retry-After``, code ``queue_full``);
``wait`` raises it with code ``queue_timeout`` after ``[ollama] max_queue_wait_seconds``. ``Retry-After`` is the
estimated time until the queue ahead is served: waiters ahead / slots x the measured service time of that model
(exponential moving average of the time a slot was held; a default until the first request finished).

Several instances (``[state] redis_url``): ``slots`` is the shared slot pool of state/slots.py. A ticket admitted
here then also takes one of the model's slots in Redis (polling every ``slots.retrySeconds`` while other instances
hold them all, within the same longest wait), so all instances together keep at most the model's slots busy at
Ollama; the lease goes back with the ticket (or expires after ``[state] lease_seconds`` if this instance dies).
The fair order is kept per instance.

Upstreams that stop taking requests (drained, down, removed): ``evict(upstream)`` takes every request waiting
there out of its queues, and ``wait`` then raises ``UpstreamClosed`` (503 ``upstream_unavailable``), which routing
(upstream/routing.py) answers by queueing the request at another upstream with the model, passing the error's
``deadline`` to ``enqueue`` so the moved request waits only what is left of its longest wait (a queue_timeout's
``deadline`` likewise bounds a try at another upstream). ``accepting(upstream)``
(the pool's routability, set by the app) is checked once a ticket holds its slot too, so no request that waited is
sent to such an upstream; requests already running there keep their slots and finish.

Reload: ``reconfigure(policy)`` applies new slots, queue lengths, longest wait and weights to the next decisions
(queued requests keep their places, running ones their slots; ``queue_order`` stays as started).

Order: start-time fair queuing by key name with ``[ratelimit] queue_weights`` (upstream/fairQueue.py); a key's
own requests keep their order. ``[ollama] queue_order = fifo`` turns fairness off (for comparison).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from config import Settings
from core.errors import ServiceError
from state.slots import SlotPool
from upstream.fairQueue import Evicted, FairLimiter, QueueFull, QueueTimeout, Ticket

DEFAULT_UPSTREAM = "default"
DEFAULT_SERVICE_SECONDS = 5.0
"""Service-time estimate of a model before any of its requests finished."""
SERVICE_TIME_SMOOTHING = 0.2
MAX_RETRY_AFTER_SECONDS = 3600
CLOSED_RETRY_AFTER_SECONDS = 2
"""Retry-After of a request whose upstream stopped taking requests while it waited (as for an unreachable one)."""
Kind = Literal["generate", "embed"]
AdmissionListener = Callable[[str, str, str, float], None]
"""(upstream, model, keyName, seconds waited): called when a request is admitted."""
RefusalListener = Callable[[str, str, str, str], None]
"""(upstream, model, keyName, reason code): called when a request is refused (queue_full, queue_timeout)."""


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """Slots and queue limits; ``slotsPerModel`` overrides ``numParallel`` by Ollama model name."""

    numParallel: int = 2
    maxQueue: int = 64
    maxQueueWaitSeconds: float = 120.0
    slotsPerModel: Mapping[str, int] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    fair: bool = True

    def slotsFor(self, model: str, kind: Kind) -> int:
        """The override for the model (``name`` also matches the ``name:latest`` Ollama lists), else 1 for embedding
        models (as Ollama loads them), else ``numParallel``."""
        for name in (model, model.removesuffix(":latest")):
            if name in self.slotsPerModel:
                return self.slotsPerModel[name]
        return 1 if kind == "embed" else self.numParallel


def policyFromSettings(settings: Settings) -> AdmissionPolicy:
    ollama = settings.ollama
    return AdmissionPolicy(numParallel=ollama.num_parallel, maxQueue=ollama.max_queue,
                           maxQueueWaitSeconds=ollama.max_queue_wait_seconds, slotsPerModel=settings.slotsPerModel,
                           weights=settings.queueWeights, fair=ollama.queue_order == "fair")


class AdmissionRefused(ServiceError):
    """503 with Retry-After: the model's queue is full, or the request waited too long (then ``deadline`` is the
    one it had: a try at another upstream keeps it)."""

    deadline: float | None = None


class UpstreamClosed(ServiceError):
    """503 with Retry-After: the upstream stopped taking requests (drained, down, removed) while this request
    waited for its slot there; routing queues it at another upstream with the model instead, with ``deadline``
    (the end of the wait it arrived with)."""

    deadline: float | None = None


def acceptsEvery(upstream: str) -> bool:
    return True


@dataclass(slots=True)
class ModelQueue:
    """The limiter of one (upstream, model) and its measured service time."""

    upstream: str
    model: str
    kind: Kind
    limiter: FairLimiter
    serviceSeconds: float = DEFAULT_SERVICE_SECONDS
    measured: int = 0

    def record(self, ticket: Ticket, heldSeconds: float) -> None:
        if self.measured == 0:
            self.serviceSeconds = heldSeconds
        else:
            self.serviceSeconds += SERVICE_TIME_SMOOTHING * (heldSeconds - self.serviceSeconds)
        self.measured += 1

    def estimateSeconds(self, ahead: int) -> float:
        """Expected wait behind ``ahead`` waiters: they leave ``slots`` at a time, one service time each."""
        return (ahead + 1) / self.limiter.limit * self.serviceSeconds

    def retryAfter(self, ahead: int) -> int:
        return min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(self.estimateSeconds(ahead))))


class Admission:
    """The queues of every (upstream, model), created on first use from the policy."""

    def __init__(self, policy: AdmissionPolicy, clock: Callable[[], float] = time.monotonic,
                 slots: SlotPool | None = None) -> None:
        self.policy = policy
        self.clock = clock
        self.slots: SlotPool | None = None
        self.useSlots(slots)
        self.queues: dict[tuple[str, str], ModelQueue] = {}
        self.admissionListeners: list[AdmissionListener] = []
        self.refusalListeners: list[RefusalListener] = []
        self.accepting: Callable[[str], bool] = acceptsEvery
        """Whether an upstream takes requests now (the pool's routability); checked once a ticket has its slot."""

    def reconfigure(self, policy: AdmissionPolicy) -> None:
        """Apply new slots, queue lengths, longest wait and weights (a reload) to the next admission decisions of
        every queue; the order (fair or FIFO) stays as started."""
        self.policy = replace(policy, fair=self.policy.fair)
        for queue in self.queues.values():
            queue.limiter.reconfigure(policy.slotsFor(queue.model, queue.kind), policy.maxQueue,
                                      policy.maxQueueWaitSeconds, policy.weights)

    def evict(self, upstream: str) -> int:
        """Take every request waiting for a slot at ``upstream`` out of its queues (it stopped taking requests);
        their ``wait`` raises UpstreamClosed. Requests holding a slot there keep it. Returns how many moved."""
        return sum(len(queue.limiter.evictWaiting()) for (name, _model), queue in self.queues.items()
                   if name == upstream)

    def useSlots(self, slots: SlotPool | None) -> None:
        """Count slots across instances too when ``slots`` is shared (Redis); a local pool adds nothing."""
        self.slots = slots if slots is not None and slots.shared else None

    def queueFor(self, upstream: str, model: str, kind: Kind = "generate") -> ModelQueue:
        queue = self.queues.get((upstream, model))
        if queue is None:
            policy = self.policy
            limiter = FairLimiter(policy.slotsFor(model, kind), policy.maxQueue, policy.maxQueueWaitSeconds,
                                  policy.weights, policy.fair, self.clock)
            queue = self.queues[(upstream, model)] = ModelQueue(upstream, model, kind, limiter)
            limiter.onRelease = self._onRelease
        return queue

    @staticmethod
    def _onRelease(ticket: Ticket, heldSeconds: float) -> None:
        lease = ticket.extra.pop("lease", None)
        if lease is not None:
            lease.release()
        ticket.extra["queue"].record(ticket, heldSeconds)

    def enqueue(self, upstream: str, model: str, keyName: str, kind: Kind = "generate",
                deadline: float | None = None) -> Ticket:
        """Admitted at once or queued; AdmissionRefused (queue_full) when the queue has no room. ``deadline`` (from
        UpstreamClosed or a queue_timeout elsewhere) ends the wait instead of now + the longest wait."""
        queue = self.queueFor(upstream, model, kind)
        try:
            ticket = queue.limiter.enqueue(keyName, deadline)
        except QueueFull as full:
            raise self._full(queue, keyName, full.ahead) from None
        ticket.extra["queue"] = queue
        if ticket.admitted:
            self._admitted(queue, ticket)
        return ticket

    def refuseIfFull(self, upstream: str, model: str, keyName: str, kind: Kind = "generate") -> None:
        """AdmissionRefused (queue_full) now when a call would find no room; lets a route refuse before it renders
        a document or builds a payload (the call itself still goes through ``enqueue``)."""
        if self.isFull(upstream, model, kind):
            queue = self.queueFor(upstream, model, kind)
            raise self._full(queue, keyName, len(queue.limiter.waiting))

    def isFull(self, upstream: str, model: str, kind: Kind = "generate") -> bool:
        """Every slot busy and the queue at ``maxQueue``: a call now would be refused."""
        queue = self.queues.get((upstream, model))  # no queue yet: nothing waits
        return queue is not None and queue.limiter.busy >= queue.limiter.limit and \
            len(queue.limiter.waiting) >= queue.limiter.maxQueue

    def _full(self, queue: ModelQueue, keyName: str, ahead: int) -> AdmissionRefused:
        self._refused(queue, keyName, "queue_full")
        return AdmissionRefused(
            503, f"The model `{queue.model}` is busy: all {queue.limiter.limit} slots are in use and {ahead} requests "
            "are waiting (the most this service queues); retry after the Retry-After seconds",
            code="queue_full", headers={"Retry-After": str(queue.retryAfter(ahead))})

    async def wait(self, ticket: Ticket) -> None:
        """Until the ticket holds a slot; AdmissionRefused (queue_timeout) after the longest wait."""
        queue: ModelQueue = ticket.extra["queue"]
        if not ticket.admitted:
            try:
                await ticket.wait()
            except QueueTimeout as timeout:
                raise self._timedOut(queue, ticket, timeout.position) from None
            except Evicted:
                raise self._closed(queue, ticket) from None
            self._admitted(queue, ticket)
        if not self.accepting(queue.upstream):  # closed while this one was handed its slot: never sent there
            ticket.release()
            raise self._closed(queue, ticket)
        if self.slots is not None and "lease" not in ticket.extra:
            await self._sharedSlot(queue, ticket)

    async def _sharedSlot(self, queue: ModelQueue, ticket: Ticket) -> None:
        """One of the model's slots across all instances (Redis), polled for within the longest wait."""
        deadline = ticket.deadline
        try:
            while (lease := await self.slots.tryAcquire(queue.upstream, queue.model, queue.limiter.limit)) is None:
                if not self.accepting(queue.upstream):
                    raise self._closed(queue, ticket)
                if self.clock() + self.slots.retrySeconds > deadline:
                    raise self._timedOut(queue, ticket, 1)
                await asyncio.sleep(self.slots.retrySeconds)
        except BaseException:
            ticket.release()  # timed out or cancelled: give the local slot back too
            raise
        if ticket.released:  # cancelled meanwhile
            lease.release()
            return
        ticket.extra["lease"] = lease

    def _timedOut(self, queue: ModelQueue, ticket: Ticket, position: int) -> AdmissionRefused:
        self._refused(queue, ticket.keyName, "queue_timeout")
        refused = AdmissionRefused(
            503, f"The model `{queue.model}` stayed busy: this request waited "
            f"{queue.limiter.maxWaitSeconds:g} s in the queue (position {position}); retry after the "
            "Retry-After seconds", code="queue_timeout", headers={"Retry-After": str(queue.retryAfter(position - 1))})
        refused.deadline = ticket.deadline
        return refused

    @staticmethod
    def _closed(queue: ModelQueue, ticket: Ticket) -> UpstreamClosed:
        closed = UpstreamClosed(
            503, f"The Ollama upstream `{queue.upstream}` stopped taking requests while this one waited for a slot of "
            f"`{queue.model}`; retry shortly", code="upstream_unavailable",
            headers={"Retry-After": str(CLOSED_RETRY_AFTER_SECONDS)})
        closed.deadline = ticket.deadline
        return closed

    @contextlib.asynccontextmanager
    async def slot(self, upstream: str, model: str, keyName: str,
                   kind: Kind = "generate") -> AsyncIterator[Ticket]:
        """Hold one slot of (upstream, model) for the block (waiting for it first)."""
        ticket = self.enqueue(upstream, model, keyName, kind)
        try:
            await self.wait(ticket)
            yield ticket
        finally:
            ticket.release()

    def _admitted(self, queue: ModelQueue, ticket: Ticket) -> None:
        for listener in self.admissionListeners:
            listener(queue.upstream, queue.model, ticket.keyName, ticket.queueSeconds)

    def _refused(self, queue: ModelQueue, keyName: str, reason: str) -> None:
        for listener in self.refusalListeners:
            listener(queue.upstream, queue.model, keyName, reason)

    def snapshot(self) -> list[dict]:
        """Per (upstream, model): slots busy, slots, queued (in total and by key name), service-time estimate."""
        return [{"upstream": queue.upstream, "model": queue.model, "kind": queue.kind,
                 "slotsBusy": queue.limiter.busy, "slots": queue.limiter.limit,
                 "queued": len(queue.limiter.waiting), "queuedByKey": queue.limiter.waitingByKey(),
                 "serviceSeconds": round(queue.serviceSeconds, 3) if queue.measured else None}
                for queue in self.queues.values()]


async def positionsWhileQueued(ticket: Ticket | None, wait: Callable[[], Awaitable[None]],
                               everySeconds: float) -> AsyncIterator[int]:
    """While the ticket waits for its slot (``wait()`` returns once admitted): its queue position every
    ``everySeconds`` (the first after ``everySeconds``, so a short wait yields nothing); ends once admitted, raises
    AdmissionRefused on a timeout. Closing the iterator early gives the place (or the slot) back."""
    if ticket is None or ticket.admitted:
        await wait()
        return
    waiter = asyncio.ensure_future(wait())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=everySeconds)
            if done:
                waiter.result()
                return
            yield ticket.position()
    finally:
        if not waiter.done():  # given up while waiting: the place (or a slot handed over just now) goes back
            ticket.release()
            waiter.cancel()
