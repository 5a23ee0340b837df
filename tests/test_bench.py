"""The benchmark harness's parsing and report functions on canned data (no timing assertions), and one smoke run of
the real harness end to end (c=1, ~1 s runs, no LiteLLM, no extras) that checks the report's shape."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import report
from bench.benchStt import summarise, tableRows, withRatios
from bench.instantUpstream import UpstreamState, decodeChunkedBody, parseHead
from bench.procs import STEAL_FIELD, parseCoreBusyTicks, parseCpuTicks, parseVmRss
from bench.run import BenchOptions, openAiBody, optionsFromEnv, serverCpu, serviceIni
from bench.streamProbe import LineClock, StreamTiming, analyseGaps, percentile, summariseLatency
from bench.wordErrors import wordErrorRate
from bench.wrkRunner import WrkError, parseWrkOutput, wrkCommand
from config import parsePerKeyLimits
from tests.conftest import REPO_ROOT

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8000/v1/chat/completions
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    52.10ms   10.22ms 120.50ms   80.00%
    Req/Sec     1.23k    80.00     1.40k    70.00%
  6150 requests in 5.00s, 4.10MB read
  Non-2xx or 3xx responses: 3
Requests/sec:   1230.00
Transfer/sec:    820.00KB
BENCHJSON {"requests":6150,"duration_us":5000000,"bytes":4300000,"connect_errors":0,"read_errors":1,"write_errors":0,\
"status_errors":3,"timeouts":2,"p50_us":48000,"p90_us":65000,"p99_us":98000,"mean_us":52100.0,"max_us":120500}
"""


def test_parseWrkOutput_readsTheSummaryLine() -> None:
    result = parseWrkOutput(WRK_OUTPUT)
    assert result.requests == 6150
    assert result.rps == pytest.approx(1230.0)
    assert (result.p50Ms, result.p90Ms, result.p99Ms) == (48.0, 65.0, 98.0)
    assert result.non2xx == 3
    assert result.errors == 3 + 1 + 2


def test_parseWrkOutput_withoutSummary_raises() -> None:
    with pytest.raises(WrkError, match="BENCHJSON"):
        parseWrkOutput("Requests/sec: 10\n")


def test_wrkCommand_pinsToTheLoadCore() -> None:
    command = wrkCommand("http://127.0.0.1:1/x", 16, 5, core=1)
    assert command[:3] == ["taskset", "-c", "1"]
    assert "-c16" in command and "-t1" in command and "-d5s" in command


def test_percentile_nearestRank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) == 0.0


def test_lineClock_timesContentLinesOnly() -> None:
    timing = StreamTiming(status=200)
    clock = LineClock(0.0, timing)
    clock.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\ndata: {"choices":[{"delta":')
    clock.feed(b'{"content":"word0 "}}]}\n\ndata: [DONE]\n\n')
    assert len(timing.contentTimes) == 1
    assert timing.ttfb > 0
    assert timing.firstContent >= timing.ttfb


def test_firstContent_isTheFirstContentLineNotTheRoleFrame() -> None:
    timing = StreamTiming(200, ttfb=0.001, total=0.010, contentTimes=[0.004, 0.006])
    assert timing.firstContent == 0.004
    summary = summariseLatency([timing], 1.0)
    assert summary["ttfbP50Ms"] == pytest.approx(1.0) and summary["contentP50Ms"] == pytest.approx(4.0)
    assert StreamTiming().firstContent == 0.0


def test_analyseGaps_countsCoalescedChunks() -> None:
    paced = [[0.010 * i for i in range(1, 33)]]
    assert analyseGaps(paced, 10.0)["coalesced"] == 0
    assert analyseGaps(paced, 10.0)["gapP50Ms"] == pytest.approx(10.0)
    bunched = [[0.0, 0.0001, 0.0002, 0.0103]]
    result = analyseGaps(bunched, 10.0)
    assert result["coalesced"] == 2 and result["gaps"] == 3
    assert result["coalescedShare"] == pytest.approx(2 / 3)


def test_summariseLatency_skipsFailures() -> None:
    timings = [StreamTiming(200, 0.001, 0.002, [0.001]), StreamTiming(503, 0.0, 0.001, [])]
    summary = summariseLatency(timings, 1.0)
    assert summary["streams"] == 1 and summary["failed"] == 1
    assert summary["ttfbP50Ms"] == pytest.approx(1.0)


def test_parseVmRss() -> None:
    assert parseVmRss("Name:\tpython\nVmRSS:\t  102400 kB\nThreads:\t3\n") == 100 * 1024 * 1024
    assert parseVmRss("Name:\tzombie\n") == 0


def test_cpuAccounting() -> None:
    stat = "1234 (python app.py) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0"
    assert parseCpuTicks(stat) == 300
    procStat = "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 5 1 4 50 9 1 2 3 0 0\ncpu1 5 0 6 50 0 0 0 0 0 0\n"
    assert parseCoreBusyTicks(procStat, 0) == 5 + 1 + 4 + 1 + 2 + 3
    assert parseCoreBusyTicks(procStat, 7) == 0
    assert parseCoreBusyTicks(procStat, 0, (STEAL_FIELD,)) == 3  # steal alone
    cpu = serverCpu(cpuUsed=2.0, coreBusy=2.5, requests=4000, seconds=5.0)
    assert cpu == {"cpuMsPerRequest": 0.5, "cpuShare": 0.4, "otherLoad": pytest.approx(0.1)}


def test_optionsFromEnv_quickAndOverrides() -> None:
    quick = optionsFromEnv({"BENCH_QUICK": "1"})
    assert quick.rounds == 1 and quick.wrkSeconds == 2 and quick.skipStub
    full = optionsFromEnv({"BENCH_SECONDS": "3", "BENCH_CONCURRENCY": "1,8", "BENCH_SKIP_LITELLM": "yes"})
    assert full.wrkSeconds == 3 and full.concurrencies == [1, 8] and full.skipLitellm and full.rounds == 2


def test_serviceIni_perKeyLimitsParse() -> None:
    text = serviceIni(8000, "http://127.0.0.1:11434", "a" * 32, "b" * 32)
    perKey = next(line for line in text.splitlines() if line.startswith("per_key"))
    limits = parsePerKeyLimits(perKey.split("=", 1)[1].strip(), {"bench", "gateway"})
    assert limits["bench"] == (10000000.0, 100000, 100000)
    assert b'"stream":true' in openAiBody(True) and b"stream" not in openAiBody(False)


def test_instantUpstream_parsing() -> None:
    method, path, headers = parseHead(b"POST /api/chat?x=1 HTTP/1.1\r\nContent-Length: 2\r\nHost: a")
    assert (method, path, headers[b"content-length"]) == ("POST", "/api/chat", b"2")
    body = bytearray(b"HEAD\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\nNEXT")
    assert decodeChunkedBody(body, 8) == (b"abcdef", len(body) - 4)
    assert decodeChunkedBody(bytearray(b"4\r\nab"), 0) is None
    state = UpstreamState(("qwen2.5:7b",), chunks=4, chunkDelayMs=0)
    assert len(state.streamLines["qwen2.5:7b"]) == 5 and state.lookup("QWEN2.5:7b") == "qwen2.5:7b"


def cannedResults(withService: bool = True) -> dict:
    def wrk(rps: float, p50: float, p99: float) -> list[dict]:
        return [{"requests": int(rps * 5), "seconds": 5.0, "rps": rps, "p50Ms": p50, "p90Ms": p50 * 1.5,
                 "p99Ms": p99, "meanMs": p50, "maxMs": p99 * 2, "errors": 0, "non2xx": 0,
                 "cpuMsPerRequest": 1000.0 / rps, "cpuShare": 1.0, "otherLoad": 0.25}]

    def probe(ttfb: float) -> list[dict]:
        return [{"streams": 100, "failed": 0, "streamsPerSecond": 50.0, "ttfbP50Ms": ttfb, "ttfbP99Ms": ttfb * 3,
                 "contentP50Ms": ttfb * 1.5, "contentP99Ms": ttfb * 4,
                 "totalP50Ms": ttfb * 2, "totalP99Ms": ttfb * 4, "contentLines": 32.0}]

    byTarget = {"service": (1500.0, 0.9, 60.0), "litellm": (250.0, 3.7, 300.0), "direct": (24000.0, 0.1, 3.0)}
    if not withService:
        del byTarget["service"]
    wrkData = {mode: {str(c): {t: wrk(*v) for t, v in byTarget.items()} for c in (1, 64)}
               for mode in ("nonstream", "stream")}
    gaps = {"streams": 5, "chunksPerStream": 32.0, "gaps": 155, "gapP10Ms": 9.8, "gapP50Ms": 10.1,
            "gapP90Ms": 10.5, "coalesced": 0, "delayMs": 10.0}
    mib = 1024 * 1024
    return {
        "meta": {"date": "2026-01-01 10:00 UTC", "nproc": 2, "cpuModel": "AMD EPYC", "memGiB": 24.0,
                 "kernel": "Linux 6.1", "python": "3.11.7", "command": "make bench", "gitCommit": "abc1234",
                 "elapsedSeconds": 300.0, "rounds": 1, "concurrencies": [1, 64], "wrkSeconds": 5.0,
                 "probeSeconds": 2.0, "pacingDelayMs": 10.0, "pacingStreams": 5, "pacingConcurrency": 16,
                 "litellmVersion": "1.74.4",
                 "wrkVersion": "debian/4.1.0", "pinning": "server on core 0, wrk on core 1",
                 "upstream": "bench/instantUpstream.py"},
        "targets": {"service": {"label": "service", "available": withService,
                                "note": "" if withService else "not measured: first chat request answered 404"},
                    "litellm": {"label": "LiteLLM 1.74.4", "available": True, "note": ""},
                    "direct": {"label": "upstream direct", "available": True, "note": ""}},
        "wrk": wrkData,
        "probe": {str(c): {t: probe(v[1]) for t, v in byTarget.items()} for c in (1, 64)},
        "pacing": {t: gaps for t in byTarget},
        "pacingConcurrent": {t: {**gaps, "streams": 32, "gaps": 992, "coalesced": 10 if t == "service" else 0}
                             for t in byTarget},
        "stub": {"concurrency": 64, "rule": 10.0, "nonstream": 1800.0, "stream": 900.0},
        "memory": {"service": {"idle": 60 * mib, "rounds": [80 * mib], "after": 81 * mib,
                               "streams": {"sample": 90 * mib, "streams": 200, "startedAtSample": 200,
                                           "completed": 200}}} if withService else {},
        "extra": {"pdf": {"pagesPerSecond": 3.5, "render": {"p50Ms": 120.0},
                          "analyze": [{"renderWorkers": 1, "rps": 20.5}, {"renderWorkers": 2, "error": "boom"}]},
                  "stt": {"error": "no model"}},
        "notes": ["a note"],
    }


def test_renderReport_tablesRatiosAndGoals() -> None:
    text = report.renderReport(cannedResults())
    assert text.startswith("# Performance")
    assert "| 64 | service | 1,500 | 0.90 |" in text
    assert "6.00x" in text  # 1500 / 250 req/s
    assert "| added p50 at concurrency 1, non-streaming | <= 1 ms | 0.80 ms | yes |" in text
    assert "| p99 at concurrency 64, non-streaming | <= 100 ms | 60.0 ms | yes |" in text
    assert "streaming, 32 chunks, ÷ LiteLLM | >= 10x | 6.00x | **no** |" in text
    assert "| service RSS with 200 open streams | <= 150 MB | 94.4 MB | yes |" in text
    assert "| pagesPerSecond | 3.50 |" in text and "| render.p50Ms | 120 |" in text
    assert "Not measured: no model" in text
    assert "| renderWorkers | rps | error |" in text and "| 2 |  | boom |" in text
    assert "`make bench`" in text and "2 cores (AMD EPYC)" in text
    assert "| 64 | service | 1,500 | 0.90 | 1.35 | 60.0 | 0 | 0.667 | 100% | 25% | 1 |" in text
    assert "the machine was busy" in text
    assert "## Hot-path changes measured with this harness" in text
    assert "Measured but not applied" not in text and "split on newlines" in text


def test_renderReport_ttfbGoalUsesTheFirstContentLineAndShowsTheFirstByte() -> None:
    text = report.renderReport(cannedResults())
    # first content: service 0.9 * 1.5 vs direct 0.1 * 1.5 -> 1.20 ms; first byte 0.9 - 0.1 -> 0.80 ms
    assert "| streaming TTFB overhead at concurrency 1 (p50, first content line) | <= 2 ms | 1.20 ms | yes |" in text
    assert "for information) | reported | 0.80 ms | — |" in text
    assert "| 1 | service | 0.90 | 2.70 | 1.35 | 3.60 | 1.80 | 3.60 | 50 | 32.0 | 0.80 | 1.20 |" in text
    assert "role frame" in text


def test_renderReport_pacingAtConcurrency16WithShareCoalesced() -> None:
    text = report.renderReport(cannedResults())
    assert "| 16 | service | 32 | 32.0 | 9.80 | 10.1 | 10.5 | 10 of 992 | 1% |" in text
    assert "| no coalescing of streamed chunks at concurrency 16 | gaps as upstream's | 10 of 992 gaps " \
           "coalesced (1%), p50 10.1 ms (upstream 10.1 ms) | yes |" in text
    results = cannedResults()
    results["pacingConcurrent"]["service"]["coalesced"] = 400
    assert "at concurrency 16 | gaps as upstream's | 400 of 992 gaps coalesced (40%)" in report.renderReport(results)
    assert "concurrency 16 | gaps as upstream's | 400 of 992 gaps coalesced (40%), p50 10.1 ms (upstream 10.1 ms) " \
           "| **no** |" in report.renderReport(results)


def test_renderReport_memoryGrowthFromIdleAndFromRoundOne() -> None:
    text = report.renderReport(cannedResults())
    assert "| service | 60.0 | 90.0 | 200 / 200 | 80.0 | 81.0 | +21.0 | +1.0 |" in text
    assert "| service RSS growth, after round 1 → after run (leak check) | ≈ 0 (<= 5 MiB) | 1.00 MiB | yes |" in text
    assert "| service RSS growth, idle → after run (includes warm-up: imports, pools, caches) | reported | 21.0 MiB " \
           "| — |" in text


def test_upstreamChoice_statesTheRuleAndTheNumbers() -> None:
    text = report.upstreamChoice(cannedResults())
    assert ">= 10x the fastest gateway's rate" in text
    assert "1,800 req/s non-streaming and 900 streaming" in text
    assert "= 1.2x the fastest gateway (1,500 req/s, service" in text and "it fails the rule" in text
    assert "instantUpstream.py served up to 24,000 req/s = 16.0x" in text
    results = cannedResults()
    del results["stub"]
    assert "was not measured" in report.upstreamChoice(results)


def test_renderReport_withoutService_marksNotAvailable() -> None:
    text = report.renderReport(cannedResults(withService=False))
    assert "| 1 | service | n/a | n/a |" in text
    assert "not measured: first chat request answered 404" in text
    assert "| added p50 at concurrency 1, non-streaming | <= 1 ms | n/a | n/a |" in text


def test_benchStt_werAndTableRows() -> None:
    assert wordErrorRate("The quick brown fox", "the quick brown fox.") == 0.0
    assert wordErrorRate("one two three four", "one three four five") == pytest.approx(0.5)
    assert wordErrorRate("Die Straße für Grüße", "die Strasse fur Grüße!") == pytest.approx(0.5)
    assert wordErrorRate("L’été à Noël", "l'été a noël") == pytest.approx(1 / 3)
    results = withRatios({"inProcess": {"medianSeconds": 1.0, "minSeconds": 0.9, "wer": 0.0},
                          "mainService": {"medianSeconds": 1.1, "minSeconds": 1.0, "wer": 0.25}}, 10.0)
    rows = tableRows("short", 10.0, results)
    assert rows[1] == "| short (10.0 s) | main service → whisper (openai SDK) | 1.10 s (min 1.00) | 0.110 | +100 ms " \
                      "(+10.0 %) | 25.0 % |"
    options = {"label": "tiny.en", "device": "cpu", "computeType": "int8", "threads": 2, "runs": 3}
    summary = summarise({"short": {"seconds": 10.0, "results": results}}, options)
    assert rows[0] in summary["markdown"] and "median of 3 runs" in summary["markdown"]


SMOKE_ENV = {"BENCH_QUICK": "1", "BENCH_SKIP_EXTRA": "1", "BENCH_SKIP_LITELLM": "1", "BENCH_CONCURRENCY": "1",
             "BENCH_SECONDS": "1", "BENCH_PROBE_SECONDS": "0.5"}
SMOKE_TIMEOUT_SECONDS = 90


@pytest.mark.skipif(shutil.which("wrk") is None or shutil.which("taskset") is None, reason="wrk/taskset missing")
def test_benchSmoke_realHarnessEndToEnd(tmp_path: Path) -> None:
    """``python -m bench.run`` with the service and the instant upstream, c=1 only (~30 s on two cores)."""
    output = tmp_path / "performance.md"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "PRIVATE_LLM_"))}, **SMOKE_ENV,
           "BENCH_OUTPUT": str(output), "BENCH_RESULTS_DIR": str(tmp_path / "results")}
    result = subprocess.run([sys.executable, "-m", "bench.run"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=SMOKE_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-3000:]
    text = output.read_text(encoding="utf-8")
    assert "## Goals of the issue (measured in this run)" in text
    assert "| streaming TTFB overhead at concurrency 1 (p50, first content line) |" in text
    for mode in ("Non-streaming", "Streaming, 32 chunks"):
        table = text.split(f"## {mode} `/v1/chat/completions`", 1)[1].split("\n## ", 1)[0]
        for label in ("service", "upstream direct"):
            row = next(line for line in table.splitlines() if line.startswith(f"| 1 | {label} |"))
            assert float(row.split("|")[3].replace(",", "")) > 0, row
    assert list((tmp_path / "results").glob("bench-*.json"))


def test_throughputTable_marksCpuOfRunsWithFewRequests() -> None:
    results = cannedResults()
    results["wrk"]["stream"]["64"]["litellm"][0]["requests"] = 40
    table = "\n".join(report.throughputTable(results, "stream"))
    assert "| 64 | LiteLLM 1.74.4 | 250 | 3.70 | 5.55 | 300 | 0 | 4.000 † |" in table
    assert "CPU per request is overstated" in table
    assert "overstated" not in "\n".join(report.throughputTable(cannedResults(), "stream"))


def test_notCoalesced_toleratesSchedulingNoiseOnly() -> None:
    upstream = {"chunksPerStream": 32.0, "gapP50Ms": 20.0, "coalesced": 0, "gaps": 155}
    assert report.notCoalesced({**upstream, "coalesced": 4}, upstream)
    assert not report.notCoalesced({**upstream, "coalesced": 40}, upstream)
    assert not report.notCoalesced({**upstream, "chunksPerStream": 8.0}, upstream)
    assert not report.notCoalesced({**upstream, "gapP50Ms": 80.0}, upstream)


def test_aggregate_meansRoundsAndSumsErrors() -> None:
    merged = report.aggregate([{"rps": 100.0, "errors": 1}, {"rps": 200.0, "errors": 2}])
    assert merged == {"rounds": 2, "rps": 150.0, "errors": 3}
    assert report.aggregate([]) is None


def test_benchOptionsDefaults() -> None:
    options = BenchOptions()
    assert options.concurrencies == [1, 16, 64] and options.serviceCore != options.loadCore
    assert asyncio.iscoroutinefunction(__import__("bench.streamProbe", fromlist=["x"]).probeLatency)


def test_waitUntilIdle_waitsForAServerThatKeepsWorkingAfterItsRun(tmp_path: Path) -> None:
    """The next wrk run must not start while the previous target still burns the core on abandoned requests."""
    from bench.procs import BenchProcess, waitUntilIdle

    busyThenIdle = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\ntime.sleep(60)\n"
    process = BenchProcess("busy", [sys.executable, "-c", busyThenIdle], dict(os.environ), 0,
                           tmp_path / "busy.log").start()
    try:
        waited = waitUntilIdle(process, limit=20)
        assert 1.0 <= waited < 20, waited  # it waited for the busy second and a half, then stopped waiting
        assert waitUntilIdle(process, limit=20) < 1.0  # idle now: at once
    finally:
        process.stop()


def test_otherGatewaysAreStoppedWhileATargetIsMeasured(tmp_path: Path) -> None:
    """A gateway that keeps working in the background (LiteLLM's loops) takes no CPU during another target's run,
    continues afterwards, and a stopped one is still stopped cleanly at the end."""
    from bench.procs import BenchProcess
    from bench.run import _Isolated

    spinning = "while True: pass\n"
    other = BenchProcess("other", [sys.executable, "-c", spinning], dict(os.environ), 0, tmp_path / "o.log").start()
    try:
        time.sleep(0.5)
        with _Isolated(None, 0, 1, False, [other]):
            time.sleep(0.2)
            before = other.cpuSeconds()
            time.sleep(0.6)
            assert other.cpuSeconds() - before < 0.05  # stopped: no CPU while the target runs
        before = other.cpuSeconds()
        time.sleep(0.6)
        assert other.cpuSeconds() - before > 0.05  # running again afterwards
        with _Isolated(None, 0, 1, False, [other]):
            other.stop(timeout=5)  # stopping a stopped process does not hang until the kill
        assert not other.alive()
    finally:
        other.stop()


@pytest.mark.parametrize(("loads", "attempts", "kept"), [((0.05,), 1, 0.05), ((0.3, 0.04), 2, 0.04),
                                                         ((0.3, 0.4, 0.2), 3, 0.2)])
def test_aDisturbedRunIsRepeatedAndNamed(tmp_path: Path, loads, attempts, kept) -> None:
    """A run whose server core others took (neighbours, steal) is repeated up to twice; the least disturbed is
    kept, and the report's notes name every repeat."""
    from bench.run import BenchRun, Target, optionsFromEnv

    bench = BenchRun(optionsFromEnv({}), tmp_path)
    runs = iter(loads)
    bench.wrkOnce = lambda target, stream, concurrency, seconds: {"otherLoad": next(runs), "stealShare": 0.01}
    target = Target("service", "service", 1, "/v1/chat/completions", "", {}, {})
    result = bench.undisturbedRun(target, False, 1)
    assert (result["otherLoad"], result["attempts"]) == (kept, attempts)
    assert len(bench.notes) == (attempts > 1)
    if attempts > 1:
        assert "service, non-streaming c=1" in bench.notes[0] and f"kept the run with {kept:.0%}" in bench.notes[0]
