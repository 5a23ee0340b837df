"""Event-loop lag and GC pauses, measured in the running service.

A task sleeps ``SAMPLE_INTERVAL_SECONDS`` over and over and records how much later than asked it woke: that is how
long everything else on the loop ran without yielding (one loop iteration under load, a synchronous call, a GC pause).
Samples go into the ``event_loop_lag_seconds`` histogram on /metrics. ``gc.callbacks`` time every collection of the
cyclic GC (``python_gc_pause_seconds`` by generation), so a lag can be put next to the GC time inside it. A wake-up
later than ``STALL_LOG_SECONDS`` is logged as one warning line with the lag and the GC time in it (no content).

Times come from ``time.perf_counter``: uvloop's ``loop.time()`` has millisecond resolution only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any, Protocol

SAMPLE_INTERVAL_SECONDS = 0.01
STALL_LOG_SECONDS = 0.25
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
logger = logging.getLogger("poweron.loop")


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class GcTimer:
    """Times each collection of the cyclic GC through ``gc.callbacks`` (installed while started)."""

    def __init__(self, pauses: Any | None = None) -> None:
        self.byGeneration = {generation: pauses.labels(str(generation)) for generation in range(3)} if pauses else {}
        """Children of a histogram with a ``generation`` label (prometheus_client); empty without one."""
        self.totalSeconds = 0.0
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self.started = now
            return
        pause = now - self.started
        self.totalSeconds += pause
        child = self.byGeneration.get(info.get("generation", -1))
        if child is not None:
            child.observe(pause)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)


class LoopLagMonitor:
    """The sampling task; ``start()`` in the app's lifespan, ``await stop()`` at its end."""

    def __init__(self, lag: Observer | None = None, gcPauses: Any | None = None,
                 interval: float = SAMPLE_INTERVAL_SECONDS, stallSeconds: float = STALL_LOG_SECONDS) -> None:
        self.lag, self.interval, self.stallSeconds = lag, interval, stallSeconds
        self.gcTimer = GcTimer(gcPauses)
        self.samples = 0
        self.worstSeconds = 0.0
        self.task: asyncio.Task | None = None

    def record(self, lagSeconds: float, gcSeconds: float) -> None:
        """One sample: into the histogram, and a warning when it is a stall."""
        self.samples += 1
        self.worstSeconds = max(self.worstSeconds, lagSeconds)
        if self.lag is not None:
            self.lag.observe(lagSeconds)
        if lagSeconds >= self.stallSeconds:
            logger.warning("event loop stalled %.0f ms (cyclic GC %.0f ms of it)", lagSeconds * 1000.0,
                           gcSeconds * 1000.0)

    async def run(self) -> None:
        while True:
            started, gcBefore = time.perf_counter(), self.gcTimer.totalSeconds
            await asyncio.sleep(self.interval)
            lagSeconds = max(0.0, time.perf_counter() - started - self.interval)
            self.record(lagSeconds, self.gcTimer.totalSeconds - gcBefore)

    def start(self) -> LoopLagMonitor:
        self.gcTimer.install()
        self.task = asyncio.get_running_loop().create_task(self.run(), name="loop-lag-monitor")
        return self

    async def stop(self) -> None:
        self.gcTimer.remove()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
