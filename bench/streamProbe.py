"""Streaming measurements wrk cannot make: time to first byte, per-chunk arrival times (coalescing check) and many
streams held open at once. A small raw-asyncio HTTP/1.1 client on keep-alive connections (uvloop when installed),
so the client costs little next to the server it measures. Throughput runs stay with wrk (bench/wrkRunner.py).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONTENT_RE = re.compile(rb'"content":\s*"(?!")')
"""A line carrying a non-empty content piece: an OpenAI SSE delta or an Ollama NDJSON message."""
HEADER_END = b"\r\n\r\n"
READ_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to send one streaming request."""

    host: str
    port: int
    path: str
    body: bytes
    bearer: str = ""

    def requestBytes(self) -> bytes:
        auth = f"Authorization: Bearer {self.bearer}\r\n" if self.bearer else ""
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: */*\r\n{auth}Content-Length: {len(self.body)}\r\n\r\n")
        return head.encode("latin-1") + self.body


@dataclass(slots=True)
class StreamTiming:
    """One streamed response: status, time to first body byte, content line arrival times, total (seconds).

    ``ttfb`` is the first body byte: for the service the OpenAI role frame it sends before any upstream content, for
    the upstream its first content chunk. ``firstContent`` (the first line carrying content) compares like with like."""

    status: int = 0
    ttfb: float = 0.0
    total: float = 0.0
    contentTimes: list[float] = field(default_factory=list)

    @property
    def firstContent(self) -> float:
        return self.contentTimes[0] if self.contentTimes else 0.0


class ProbeError(RuntimeError):
    """The server answered something this client does not understand."""


async def _readHead(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(HEADER_END)
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class LineClock:
    """Splits body bytes into lines and notes the arrival time of every line with content."""

    def __init__(self, started: float, timing: StreamTiming) -> None:
        self.started, self.timing, self.pending = started, timing, b""

    def feed(self, data: bytes) -> None:
        if not data:
            return
        now = time.perf_counter() - self.started
        if not self.timing.ttfb:
            self.timing.ttfb = now
        *lines, self.pending = (self.pending + data).split(b"\n")
        self.timing.contentTimes.extend(now for line in lines if CONTENT_RE.search(line))


async def _readChunked(reader: asyncio.StreamReader, clock: LineClock) -> None:
    while True:
        sizeLine = await reader.readline()
        size = int(sizeLine.split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return
        clock.feed((await reader.readexactly(size + 2))[:-2])


async def timedRequest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes,
                       timing: StreamTiming | None = None) -> StreamTiming:
    """Send one request on an open connection and time its response (filling ``timing`` as bytes arrive)."""
    timing = timing if timing is not None else StreamTiming()
    started = time.perf_counter()
    writer.write(request)
    status, headers = await _readHead(reader)
    timing.status = status
    clock = LineClock(started, timing)
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        await _readChunked(reader, clock)
    elif b"content-length" in headers:
        clock.feed(await reader.readexactly(int(headers[b"content-length"])))
    else:
        raise ProbeError("response has neither chunked framing nor Content-Length")
    timing.total = time.perf_counter() - started
    return timing


async def _worker(endpoint: Endpoint, deadline: float, maxRequests: int, results: list[StreamTiming]) -> None:
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    request = endpoint.requestBytes()
    try:
        while time.perf_counter() < deadline and len(results) < maxRequests:
            results.append(await asyncio.wait_for(timedRequest(reader, writer, request), READ_TIMEOUT_SECONDS))
    finally:
        writer.close()


async def probeLatency(endpoint: Endpoint, concurrency: int, seconds: float, maxRequests: int) -> list[StreamTiming]:
    """``concurrency`` connections sending streaming requests back to back for ``seconds``."""
    results: list[StreamTiming] = []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(_worker(endpoint, deadline, maxRequests, results) for _ in range(concurrency)))
    return results


async def probeSequential(endpoint: Endpoint, count: int) -> list[StreamTiming]:
    """``count`` streams one after the other on one connection (for the pacing check)."""
    results: list[StreamTiming] = []
    await _worker(endpoint, time.perf_counter() + 3600, count, results)
    return results


async def probeConcurrentStreams(endpoint: Endpoint, concurrency: int, perConnection: int) -> list[StreamTiming]:
    """``concurrency`` connections, each sending ``perConnection`` streams one after the other (pacing under load)."""
    perWorker = await asyncio.gather(*(probeSequential(endpoint, perConnection) for _ in range(concurrency)))
    return [timing for timings in perWorker for timing in timings]


async def holdStreams(endpoint: Endpoint, count: int, sampleAfter: float, sample: Callable[[], Any],
                      capSeconds: float) -> dict[str, Any]:
    """Open ``count`` streams at once, call ``sample()`` after ``sampleAfter`` seconds (while they are open),
    then wait for them (at most ``capSeconds``). Returns the sample, how many had started and finished."""
    timings = [StreamTiming() for _ in range(count)]
    tasks = [asyncio.ensure_future(_oneStream(endpoint, timing)) for timing in timings]
    await asyncio.sleep(sampleAfter)
    sampled = sample()
    startedCount = sum(1 for timing in timings if timing.ttfb)
    done, pending = await asyncio.wait(tasks, timeout=capSeconds)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    finished = sum(1 for task in done if not task.exception() and task.result().status == 200)
    return {"sample": sampled, "streams": count, "startedAtSample": startedCount, "completed": finished}


async def _oneStream(endpoint: Endpoint, timing: StreamTiming) -> StreamTiming:
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        return await timedRequest(reader, writer, endpoint.requestBytes(), timing)
    finally:
        writer.close()


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100.0 * len(ordered))))
    return ordered[rank - 1]


def summariseLatency(timings: list[StreamTiming], seconds: float) -> dict[str, Any]:
    """TTFB (first byte), first content line and total percentiles in milliseconds, streams per second, failures."""
    good = [t for t in timings if t.status == 200]
    ttfb = [t.ttfb * 1000.0 for t in good]
    content = [t.firstContent * 1000.0 for t in good if t.contentTimes]
    total = [t.total * 1000.0 for t in good]
    return {"streams": len(good), "failed": len(timings) - len(good), "streamsPerSecond": len(good) / seconds,
            "ttfbP50Ms": percentile(ttfb, 50), "ttfbP99Ms": percentile(ttfb, 99),
            "contentP50Ms": percentile(content, 50), "contentP99Ms": percentile(content, 99),
            "totalP50Ms": percentile(total, 50), "totalP99Ms": percentile(total, 99),
            "contentLines": round(sum(len(t.contentTimes) for t in good) / max(1, len(good)), 1)}


def analyseGaps(streams: list[list[float]], delayMs: float) -> dict[str, Any]:
    """Inter-chunk gaps of paced streams (content line arrival times in seconds, one list per stream).

    A gap under a quarter of the pacing means two chunks arrived together (coalesced)."""
    gaps = [(later - earlier) * 1000.0 for times in streams for earlier, later in zip(times, times[1:])]
    coalesced = sum(1 for gap in gaps if gap < delayMs / 4.0)
    return {"streams": len(streams), "chunksPerStream": round(sum(map(len, streams)) / max(1, len(streams)), 1),
            "gaps": len(gaps), "gapP10Ms": percentile(gaps, 10), "gapP50Ms": percentile(gaps, 50),
            "gapP90Ms": percentile(gaps, 90), "coalesced": coalesced,
            "coalescedShare": coalesced / len(gaps) if gaps else 0.0, "delayMs": delayMs}


def runAsync(coroutine: Any) -> Any:
    """Run a coroutine on uvloop when it is installed."""
    try:
        import uvloop
        return uvloop.run(coroutine)
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        return asyncio.run(coroutine)
