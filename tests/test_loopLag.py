"""observe/loopLag.py: a blocked event loop shows up in event_loop_lag_seconds (and in the log when it is a stall),
GC collections in python_gc_pause_seconds, both on /metrics; the monitor starts and stops with the app. The tests
block the loop on purpose for a known time and check that it is seen; nothing asserts how fast anything is."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram

from app import createApp
from observe.loopLag import GC_PAUSE_BUCKETS, LAG_BUCKETS, GcTimer, LoopLagMonitor
from tests.conftest import API_KEY
from tests.test_metrics import parseMetrics, sampleValue

BLOCK_SECONDS = 0.2
INTERVAL = 0.01


def histograms() -> tuple[CollectorRegistry, Histogram, Histogram]:
    registry = CollectorRegistry()
    lag = Histogram("event_loop_lag_seconds", "lag", buckets=LAG_BUCKETS, registry=registry)
    pauses = Histogram("python_gc_pause_seconds", "gc", ["generation"], buckets=GC_PAUSE_BUCKETS, registry=registry)
    return registry, lag, pauses


def countAtLeast(registry: CollectorRegistry, bound: float) -> float:
    """Lag samples above ``bound`` (a bucket boundary): all samples minus those at or below it."""
    total = registry.get_sample_value("event_loop_lag_seconds_count") or 0.0
    below = registry.get_sample_value("event_loop_lag_seconds_bucket", {"le": str(bound)}) or 0.0
    return total - below


async def wakeUps(monitor: LoopLagMonitor, count: int) -> None:
    target = monitor.samples + count
    while monitor.samples < target:
        await asyncio.sleep(INTERVAL)


async def test_aBlockedLoopIsRecordedAsOneLateWakeUp() -> None:
    registry, lag, pauses = histograms()
    monitor = LoopLagMonitor(lag, pauses, interval=INTERVAL).start()
    try:
        await wakeUps(monitor, 2)
        assert countAtLeast(registry, 0.1) == 0  # an idle loop wakes the task on time
        time.sleep(BLOCK_SECONDS)  # a synchronous call on the loop: nothing else runs meanwhile
        await wakeUps(monitor, 2)
    finally:
        await monitor.stop()
    assert countAtLeast(registry, 0.1) == 1
    assert monitor.worstSeconds >= BLOCK_SECONDS - INTERVAL
    assert registry.get_sample_value("event_loop_lag_seconds_count") == monitor.samples


async def test_aStallIsLoggedWithTheGcTimeInIt(caplog: pytest.LogCaptureFixture) -> None:
    monitor = LoopLagMonitor(interval=INTERVAL, stallSeconds=0.1).start()
    try:
        await wakeUps(monitor, 1)
        with caplog.at_level(logging.WARNING, logger="poweron.loop"):
            time.sleep(BLOCK_SECONDS)
            await wakeUps(monitor, 1)
    finally:
        await monitor.stop()
    stalls = [record.getMessage() for record in caplog.records if "stalled" in record.getMessage()]
    assert len(stalls) == 1 and "cyclic GC" in stalls[0]


def test_recordAttributesGcTimeAndKeepsTheWorst(caplog: pytest.LogCaptureFixture) -> None:
    registry, lag, _ = histograms()
    monitor = LoopLagMonitor(lag, stallSeconds=0.25)
    with caplog.at_level(logging.WARNING, logger="poweron.loop"):
        monitor.record(0.004, 0.0)
        monitor.record(0.3, 0.12)
    assert monitor.samples == 2 and monitor.worstSeconds == 0.3
    assert registry.get_sample_value("event_loop_lag_seconds_bucket", {"le": "0.005"}) == 1
    assert [record.getMessage() for record in caplog.records] == ["event loop stalled 300 ms (cyclic GC 120 ms of it)"]


def test_gcTimerRecordsEachCollectionByGeneration() -> None:
    registry, _, pauses = histograms()
    timer = GcTimer(pauses)
    timer.install()
    try:
        gc.collect()
    finally:
        timer.remove()
    assert timer not in gc.callbacks
    assert registry.get_sample_value("python_gc_pause_seconds_count", {"generation": "2"}) >= 1
    assert timer.totalSeconds > 0
    gc.collect()  # removed: no longer counted
    assert registry.get_sample_value("python_gc_pause_seconds_count", {"generation": "2"}) == 1


async def test_stopEndsTheTaskAndRemovesTheGcCallback() -> None:
    monitor = LoopLagMonitor(interval=INTERVAL).start()
    await wakeUps(monitor, 1)
    await monitor.stop()
    assert monitor.task is None and monitor.gcTimer not in gc.callbacks
    await monitor.stop()  # twice is harmless


async def test_metricsExportTheLoopLagAndGcPausesOfTheRunningApp(makeSettings) -> None:
    app = createApp(makeSettings())
    callbacksBefore = len(gc.callbacks)
    async with app.router.lifespan_context(app):
        assert len(gc.callbacks) == callbacksBefore + 1
        await wakeUps(app.state.loopLag, 1)
        time.sleep(BLOCK_SECONDS)
        await wakeUps(app.state.loopLag, 1)
        gc.collect()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service") as client:
            response = await client.get("/metrics", headers={"X-API-Key": API_KEY})
    assert len(gc.callbacks) == callbacksBefore
    samples = parseMetrics(response.text)
    assert sampleValue(samples, "event_loop_lag_seconds_count") >= 1
    assert sampleValue(samples, "event_loop_lag_seconds_count") - sampleValue(
        samples, "event_loop_lag_seconds_bucket", le="0.1") >= 1
    assert sampleValue(samples, "python_gc_pause_seconds_count", generation="2") >= 1
    assert "# HELP event_loop_lag_seconds How much later than asked a task sleeping 10 ms" in response.text


async def test_withoutMetricsTheMonitorStillRuns(makeSettings) -> None:
    app = createApp(makeSettings(metrics={"enabled": False}))
    async with app.router.lifespan_context(app):
        assert not hasattr(app.state, "metrics")
        await wakeUps(app.state.loopLag, 2)
