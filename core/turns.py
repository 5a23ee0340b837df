"""Turns on the event loop: at most ``STEPS_PER_TURN`` request steps per loop iteration, in the order they asked.

Under load one loop iteration runs one step of every request that is ready, and everything waiting on the loop (a
new connection, a health probe, the next chunk of a stream, a timer) waits for the whole iteration: at 64 busy
connections that was 20-100 ms per iteration (docu/performance.md, "Stalls under load"). A request asks for a turn
before each of its CPU-heavy steps (when it arrives, after it is planned, after the upstream's answer, between slices
of a stream burst); the gate lets ``STEPS_PER_TURN`` of them go per iteration, first come first served, and keeps
the rest for the next iterations. The same work gets done (throughput does not change: the core is busy either
way), but an iteration stays short and every request moves on at the same pace.
"""

from __future__ import annotations

import asyncio
from collections import deque

from starlette.types import Scope

STEPS_PER_TURN = 6
"""Request steps let through per loop iteration; a step costs 0.1-0.4 ms of CPU, so an iteration stays a few ms.
At 64 concurrent requests on one core, 6 halved the median loop lag of 12 (<= 2.5-5 ms instead of <= 5-10 ms) at
the same throughput within the machine's noise (docu/performance.md, "Stalls under load", third session)."""
TURNS_SCOPE_KEY = "poweron.turns"


class TurnGate:
    """The gate of one event loop (one per app; requests find it in their scope)."""

    def __init__(self, stepsPerTurn: int = STEPS_PER_TURN) -> None:
        self.stepsPerTurn = stepsPerTurn
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.releaseScheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop of the waiters (an app served again on a new loop, as tests do, starts afresh)."""
        self.requests = 0
        """Requests in flight, counted by RequestContextMiddleware (0 where nothing counts them)."""

    def alone(self) -> bool:
        """One request in flight and nobody waiting: a turn would give the loop to no one (at concurrency 1 that
        was six idle loop iterations per request), so ``takeTurn`` goes straight on."""
        return self.requests == 1 and not self.waiting

    async def turn(self) -> None:
        """Give up the loop and come back in order: at the next iteration when few wait, later when many do."""
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            self.loop, self.waiting, self.releaseScheduled = loop, deque(), False
        waiter: asyncio.Future[None] = loop.create_future()
        self.waiting.append(waiter)
        if not self.releaseScheduled:
            self.releaseScheduled = True
            loop.call_soon(self._release)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # released and cancelled at once: pass the turn on
                self._releaseOne()
            raise

    def _release(self) -> None:
        """Once per iteration while anyone waits: wake the next ``stepsPerTurn`` waiters (they run next iteration)."""
        released = 0
        while self.waiting and released < self.stepsPerTurn:
            released += self._releaseOne()
        if self.waiting and self.loop is not None:
            self.loop.call_soon(self._release)
        else:
            self.releaseScheduled = False

    def _releaseOne(self) -> int:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return 1
        return 0


async def takeTurn(scope: Scope) -> None:
    """Wait for this request's next turn (``asyncio.sleep(0)`` where no gate is installed, e.g. in unit tests; no
    wait while the request is the only one in flight)."""
    gate: TurnGate | None = scope.get(TURNS_SCOPE_KEY)
    if gate is None:
        await asyncio.sleep(0)
    elif not gate.alone():
        await gate.turn()
