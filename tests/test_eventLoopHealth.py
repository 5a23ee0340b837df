"""Event loop health under load: with 200 slow chat streams open through the real service process,
``/health/liveliness`` still answers within 50 ms (median), and not much slower than with no stream open (ratio of
the medians); every stream then ends correctly with ``[DONE]`` and its own full answer.

The Ollama stub runs as its own process and the liveliness probe in another one, so neither the stub's pacing of
200 streams nor this process's reading of them (both Python, one GIL each) is counted as the service's latency.
A service that blocks its event loop with synchronous work (a sleep, a synchronous parse or render per chunk)
answers the probe late and fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.conftest import (
    OPENAI_KEY,
    REPO_ROOT,
    TEST_INI,
    ServiceProcess,
    freePort,
    guardedEnv,
    stopProcess,
    waitForHttp,
)
from tests.ollamaStub import REPLY_TEMPLATE

pytestmark = pytest.mark.e2e
STREAMS = 200
CHUNKS, CHUNK_DELAY_MS = 30, 200
"""Each stream lasts about 6 s upstream: long enough to open all 200 and probe while every one is open."""
SAMPLES = 30
LIVELINESS_LIMIT_SECONDS = 0.050
MAX_SLOWDOWN = 10.0
"""Loaded median / idle median. Generous (2 shared cores, 1,000 chunks/s through the service), but a loop blocked by
synchronous work is slower by far more."""
OPENAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}
IN_FLIGHT = re.compile(r"^poweron_requests_in_flight (\S+)$", re.MULTILINE)
PROBE_SCRIPT = """
import http.client, json, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
connection = http.client.HTTPConnection(host, port, timeout=10)
latencies = []
for index in range(count + 3):  # 3 warm-up requests (connection, first route lookups) are not counted
    started = time.perf_counter()
    connection.request("GET", "/health/liveliness")
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        sys.exit(f"liveliness answered {response.status}")
    if index >= 3:
        latencies.append(time.perf_counter() - started)
    time.sleep(0.03)
print(json.dumps(latencies))
"""


@pytest.fixture(scope="module")
def stubProcess() -> Iterator[str]:
    """The Ollama stub as its own process, pacing every answer: CHUNKS pieces, CHUNK_DELAY_MS apart."""
    port = freePort()
    process = subprocess.Popen([sys.executable, "-m", "tests.ollamaStub", "--port", str(port), "--models",
                                "qwen2.5:7b", "--chunks", str(CHUNKS), "--chunk-delay-ms", str(CHUNK_DELAY_MS),
                                "--no-record", "--kind"], cwd=REPO_ROOT, env=guardedEnv(dict(os.environ)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        waitForHttp(f"http://127.0.0.1:{port}/api/version", timeout=20, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stopProcess(process)


@pytest.fixture(scope="module")
def service(stubProcess: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    ini = tmp_path_factory.mktemp("loop-health") / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    limits = {"PRIVATE_LLM_RATELIMIT__MAX_CONCURRENT_PER_KEY": "1000", "PRIVATE_LLM_RATELIMIT__OPENAI_BURST": "1000",
              "PRIVATE_LLM_RATELIMIT__OPENAI_REQUESTS_PER_MINUTE": "100000",
              "PRIVATE_LLM_OLLAMA__MAX_CONNECTIONS": "256", "PRIVATE_LLM_SERVER__LOG_LEVEL": "warning"}
    with ServiceProcess(ini, {"PRIVATE_LLM_OLLAMA__BASE_URL": stubProcess, **limits}) as process:
        deadline = time.monotonic() + 10
        while not httpx.get(process.baseUrl + "/v1/models", headers=OPENAI_HEADERS).json()["data"]:
            assert time.monotonic() < deadline, "the service never listed the stub's models"
            time.sleep(0.1)
        yield process


def probeLiveliness(service: ServiceProcess) -> list[float]:
    """SAMPLES latencies of GET /health/liveliness, measured by a separate process over one keep-alive connection."""
    done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, "127.0.0.1", str(service.port), str(SAMPLES)],
                          env=guardedEnv(dict(os.environ)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def requestsInFlight(service: ServiceProcess) -> int:
    text = httpx.get(service.baseUrl + "/metrics", headers=OPENAI_HEADERS, timeout=10).text
    return int(float(IN_FLIGHT.search(text).group(1))) - 1  # not the scrape itself


class StreamRecord:
    """What one client saw of its stream."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.done = False
        self.firstPieceAt: float | None = None
        self.endedAt: float | None = None


async def readStream(client: httpx.AsyncClient, index: int, record: StreamRecord) -> None:
    body = {"model": "poweron-text-general", "stream": True,
            "messages": [{"role": "user", "content": f"stream {index}"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                record.done = True
            elif line.startswith("data: "):
                choices = orjson.loads(line[6:]).get("choices") or [{}]
                piece = choices[0].get("delta", {}).get("content")
                if piece:
                    record.content.append(piece)
                    record.firstPieceAt = record.firstPieceAt or time.monotonic()
    record.endedAt = time.monotonic()


async def waitForAllOpen(records: list[StreamRecord], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(record.firstPieceAt is None for record in records):
        assert time.monotonic() < deadline, "not all streams were receiving after %g s" % timeout
        await asyncio.sleep(0.05)


async def test_livelinessStaysFastWith200SlowStreamsOpen(service: ServiceProcess) -> None:
    idle = await asyncio.to_thread(probeLiveliness, service)
    records = [StreamRecord() for _ in range(STREAMS)]
    limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=STREAMS + 10)
    async with httpx.AsyncClient(base_url=service.baseUrl, headers=OPENAI_HEADERS, limits=limits,
                                 timeout=httpx.Timeout(30)) as client:
        tasks = [asyncio.create_task(readStream(client, index, record)) for index, record in enumerate(records)]
        await waitForAllOpen(records, 15)
        openInService = await asyncio.to_thread(requestsInFlight, service)
        probeStarted = time.monotonic()
        loaded = await asyncio.to_thread(probeLiveliness, service)
        probeEnded = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    assert openInService == STREAMS
    assert all(record.endedAt > probeEnded for record in records), "a stream ended before the probe did"
    idleMedian, loadedMedian = statistics.median(idle), statistics.median(loaded)
    summary = (f"idle median {idleMedian * 1000:.2f} ms, with {STREAMS} streams {loadedMedian * 1000:.2f} ms "
               f"(max {max(loaded) * 1000:.1f} ms, probe {probeEnded - probeStarted:.1f} s)")
    print(summary)
    assert loadedMedian < LIVELINESS_LIMIT_SECONDS, summary
    assert loadedMedian / idleMedian < MAX_SLOWDOWN, summary
    for index, record in enumerate(records):
        assert record.done, f"stream {index} ended without [DONE]"
        assert "".join(record.content) == REPLY_TEMPLATE.format(prompt=f"stream {index}"), f"stream {index}"
    assert await asyncio.to_thread(requestsInFlight, service) == 0
