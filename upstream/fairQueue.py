"""A slot limiter with a bounded wait queue served fairly across key names (start-time fair queuing).

``FairLimiter(limit, maxQueue, maxWaitSeconds, weights)`` lets at most ``limit`` holders run at once; the rest wait
in a queue of at most ``maxQueue``. The queue is not first come, first served: every waiter gets a virtual start
tag ``max(virtualTime, lastFinish[key])`` and its key's ``lastFinish`` advances by ``1 / weight``; the waiter with
the smallest tag goes next (ties: arrival order), and the virtual time becomes its tag. A key with weight 4 gets
four slots for every one of a weight-1 key while both have work waiting; a key that floods the queue pushes only
its own later requests back; a key that was idle starts at the current virtual time (no saved-up credit), and
when no slot is busy the tags start afresh. Within
one key the tags grow, so a key's own requests keep their order. ``fair=False`` gives plain FIFO (benchmarks).

Each ticket's wait ends at its ``deadline`` (enqueued + ``maxWaitSeconds``, or one handed to ``enqueue`` by an owner
that moves a waiter here from another queue, so its wait from arrival stays bounded). No timing in here besides
that deadline (asyncio.timeout) and the injected ``clock`` for measurements; the
unit tests drive it step by step. Used by ``upstream/admission.py`` (one per upstream and model) and by the render
pool (one for its workers).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_WEIGHT = 1.0


class QueueFull(Exception):
    """No room in the queue: ``ahead`` waiters are queued already."""

    def __init__(self, ahead: int) -> None:
        super().__init__(f"queue full ({ahead} waiting)")
        self.ahead = ahead


class Evicted(Exception):
    """The waiter was taken out of the queue by ``evictWaiting`` (its owner sends it elsewhere)."""


class QueueTimeout(Exception):
    """The waiter was not admitted within ``maxWaitSeconds``; ``position`` was its place when it gave up."""

    def __init__(self, position: int) -> None:
        super().__init__(f"waited too long (position {position})")
        self.position = position


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place: queued, then admitted (holding a slot), then released. ``release()`` is idempotent."""

    limiter: FairLimiter
    keyName: str
    tag: float
    sequence: int
    enqueuedAt: float
    deadline: float
    """When the wait gives up (``clock`` time): enqueued + max wait, or the deadline it brought from another queue."""
    future: asyncio.Future | None = None
    admittedAt: float | None = None
    released: bool = False
    evicted: bool = False
    """Taken out of the queue by ``evictWaiting``: never admitted here; ``wait`` raises Evicted."""
    extra: dict = field(default_factory=dict)
    """Free room for the owner (e.g. the upstream and model a ticket is for)."""

    @property
    def admitted(self) -> bool:
        return self.admittedAt is not None

    @property
    def queueSeconds(self) -> float:
        """Time spent waiting (so far, while still queued)."""
        end = self.admittedAt if self.admittedAt is not None else self.limiter.clock()
        return max(0.0, end - self.enqueuedAt)

    def position(self) -> int:
        """0 once admitted; else 1 + the number of waiters that go before this one in the fair order now."""
        return self.limiter.positionOf(self)

    async def wait(self) -> None:
        """Until admitted (at once when it is). Raises QueueTimeout after the limiter's max wait; a cancelled
        waiter leaves the queue (or gives back the slot it was just handed)."""
        await self.limiter.waitFor(self)

    def release(self) -> None:
        self.limiter.release(self)


class FairLimiter:
    """At most ``limit`` admitted tickets; waiting tickets in fair order (see module docstring)."""

    def __init__(self, limit: int, maxQueue: int, maxWaitSeconds: float,
                 weights: Mapping[str, float] | None = None, fair: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 onRelease: Callable[[Ticket, float], None] | None = None) -> None:
        self.limit = max(1, limit)
        self.maxQueue = max(0, maxQueue)
        self.maxWaitSeconds = maxWaitSeconds
        self.weights = dict(weights or {})
        self.fair = fair
        self.clock = clock
        self.onRelease = onRelease
        """Called with (ticket, seconds held) when an admitted ticket is released (service-time measurement)."""
        self.busy = 0
        self.waiting: list[Ticket] = []
        self.virtualTime = 0.0
        self.lastFinish: dict[str, float] = {}
        self.sequence = itertools.count()
        self.admittedTotal = 0
        self.busySeconds = 0.0
        """Slot-seconds held by released tickets (utilisation = busySeconds / (limit * elapsed))."""

    def weightOf(self, keyName: str) -> float:
        return self.weights.get(keyName, DEFAULT_WEIGHT)

    def enqueue(self, keyName: str, deadline: float | None = None) -> Ticket:
        """A ticket, admitted at once when a slot is free and nobody waits; else queued. QueueFull when the queue
        holds ``maxQueue`` waiters already. ``deadline`` (``clock`` time) ends its wait instead of now + max wait
        (a waiter moved here from another queue keeps the deadline it arrived with)."""
        if self.busy < self.limit and not self.waiting:
            ticket = self._newTicket(keyName, deadline)
            self._admit(ticket)
            return ticket
        if len(self.waiting) >= self.maxQueue:
            raise QueueFull(len(self.waiting))
        ticket = self._newTicket(keyName, deadline)
        self.waiting.append(ticket)
        return ticket

    def _newTicket(self, keyName: str, deadline: float | None) -> Ticket:
        sequence = next(self.sequence)
        now = self.clock()
        return Ticket(self, keyName, self._nextTag(keyName, sequence), sequence, now,
                      now + self.maxWaitSeconds if deadline is None else deadline)

    def _nextTag(self, keyName: str, sequence: int) -> float:
        if not self.fair:
            return float(sequence)
        start = max(self.virtualTime, self.lastFinish.get(keyName, 0.0))
        self.lastFinish[keyName] = start + 1.0 / self.weightOf(keyName)
        return start

    @staticmethod
    def _order(ticket: Ticket) -> tuple[float, int]:
        return ticket.tag, ticket.sequence

    def _admit(self, ticket: Ticket) -> None:
        self.busy += 1
        self.admittedTotal += 1
        ticket.admittedAt = self.clock()
        if self.fair:
            self.virtualTime = max(self.virtualTime, ticket.tag)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.set_result(None)

    def _dispatch(self) -> None:
        while self.busy < self.limit and self.waiting:
            chosen = min(self.waiting, key=self._order)
            self.waiting.remove(chosen)
            self._admit(chosen)

    def positionOf(self, ticket: Ticket) -> int:
        if ticket.admitted or ticket.released:
            return 0
        mine = self._order(ticket)
        return 1 + sum(1 for other in self.waiting if self._order(other) < mine)

    async def waitFor(self, ticket: Ticket) -> None:
        if ticket.evicted:
            raise Evicted()
        if ticket.admitted:
            return
        if ticket.future is None:
            ticket.future = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(max(0.0, ticket.deadline - self.clock())):
                await asyncio.shield(ticket.future)
        except TimeoutError:
            if ticket.admitted:  # handed a slot as the time ran out: keep it
                return
            if ticket.evicted:
                raise Evicted() from None
            position = self.positionOf(ticket)
            self._leave(ticket)
            raise QueueTimeout(position) from None
        except BaseException:
            self.release(ticket)  # cancelled: leave the queue, or give back the slot just handed over
            raise
        if ticket.evicted:
            raise Evicted()

    def _leave(self, ticket: Ticket) -> None:
        ticket.released = True
        if ticket in self.waiting:
            self.waiting.remove(ticket)

    def release(self, ticket: Ticket) -> None:
        """Give back the slot (or leave the queue); idempotent."""
        if ticket.released:
            return
        if not ticket.admitted:
            self._leave(ticket)
            return
        ticket.released = True
        held = max(0.0, self.clock() - (ticket.admittedAt or 0.0))
        self.busySeconds += held
        self.busy -= 1
        if self.onRelease is not None:
            self.onRelease(ticket, held)
        self._dispatch()
        self._resetWhenIdle()

    def _resetWhenIdle(self) -> None:
        if self.busy == 0 and not self.waiting:  # idle: nobody is ahead of anybody any more
            self.virtualTime = 0.0
            self.lastFinish.clear()

    def evictWaiting(self) -> list[Ticket]:
        """Take every waiter out of the queue at once (their ``wait`` raises Evicted); admitted tickets keep their
        slots. The tickets evicted."""
        evicted, self.waiting = self.waiting, []
        for ticket in evicted:
            ticket.evicted = ticket.released = True
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_result(None)
        self._resetWhenIdle()
        return evicted

    def reconfigure(self, limit: int, maxQueue: int, maxWaitSeconds: float, weights: Mapping[str, float]) -> None:
        """New limits for the next decisions: waiters keep their tags (their places), running tickets their slots
        (fewer slots than busy: nobody new goes until enough have finished); more slots admit waiters now. A
        waiter already queued keeps the deadline it was given."""
        self.limit = max(1, limit)
        self.maxQueue = max(0, maxQueue)
        self.maxWaitSeconds = maxWaitSeconds
        self.weights = dict(weights)
        self._dispatch()

    def waitingByKey(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ticket in self.waiting:
            counts[ticket.keyName] = counts.get(ticket.keyName, 0) + 1
        return counts
