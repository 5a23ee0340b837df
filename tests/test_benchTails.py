"""bench/tails.py on canned data: the loop-lag histogram from /metrics scrapes, quantile bounds, the per-round tail
table with its stall flag (max > 5x p50), the lag histogram section and issue 20's goal rows. No timing."""

from __future__ import annotations

import math

from bench import report, tails
from bench.run import loopLagBetween
from bench.wrkRunner import parseWrkOutput
from tests.test_bench import cannedResults

SCRAPE_BEFORE = """# HELP event_loop_lag_seconds lag
# TYPE event_loop_lag_seconds histogram
event_loop_lag_seconds_bucket{le="0.005"} 100.0
event_loop_lag_seconds_bucket{le="0.02"} 110.0
event_loop_lag_seconds_bucket{le="0.1"} 110.0
event_loop_lag_seconds_bucket{le="+Inf"} 110.0
event_loop_lag_seconds_count 110.0
event_loop_lag_seconds_sum 0.5
python_gc_pause_seconds_sum{generation="0"} 0.25
python_gc_pause_seconds_sum{generation="2"} 0.5
poweron_request_duration_seconds_bucket{le="0.005",model="none",route="/v1/models"} 3.0
"""
SCRAPE_AFTER = SCRAPE_BEFORE.replace('le="0.005"} 100.0', 'le="0.005"} 400.0').replace(
    'le="0.02"} 110.0', 'le="0.02"} 900.0').replace('le="0.1"} 110.0', 'le="0.1"} 998.0').replace(
    'le="+Inf"} 110.0', 'le="+Inf"} 1110.0').replace("_count 110.0", "_count 1110.0").replace(
    "_sum 0.5\n", "_sum 20.5\n").replace('generation="0"} 0.25', 'generation="0"} 0.75').replace(
    'generation="2"} 0.5', 'generation="2"} 0.625')


def run(p50: float, p99: float, maxMs: float, lag: dict | None = None, **extra: float) -> dict:
    result = {"rps": 1000.0, "p50Ms": p50, "p90Ms": p50 * 1.2, "p99Ms": p99, "p999Ms": (p99 + maxMs) / 2,
              "maxMs": maxMs, "meanMs": p50, "requests": 5000, "seconds": 5.0, "errors": 0, "non2xx": 0, **extra}
    if lag is not None:
        result["loopLag"] = lag
    return result


def test_parseHistogram_readsBucketsCountAndSumOfOneMetric() -> None:
    histogram = tails.parseHistogram(SCRAPE_BEFORE, tails.LAG_METRIC)
    assert histogram == {"buckets": [[0.005, 100.0], [0.02, 110.0], [0.1, 110.0], [math.inf, 110.0]],
                         "count": 110.0, "sum": 0.5}


def test_loopLagBetween_isWhatTheRunAdded() -> None:
    between = loopLagBetween(SCRAPE_BEFORE, SCRAPE_AFTER)
    assert between["loopLag"] == {"buckets": [[0.005, 300.0], [0.02, 790.0], [0.1, 888.0], [math.inf, 1000.0]],
                                  "count": 1000.0, "sum": 20.0}
    assert between["gcSeconds"] == {"0": 0.5, "2": 0.125}
    assert loopLagBetween(None, SCRAPE_AFTER) == {}


def test_quantileBound_isTheUpperBoundOfTheBucketHoldingTheRank() -> None:
    lag = loopLagBetween(SCRAPE_BEFORE, SCRAPE_AFTER)["loopLag"]
    assert tails.quantileBound(lag, 0.5) == 0.02  # 500th sample: 300 <= 5 ms, 790 <= 20 ms
    assert tails.quantileBound(lag, 0.8) == 0.1
    assert tails.quantileBound(lag, 0.999) == math.inf  # 112 samples above the last finite bound
    assert tails.fmtBound(0.02) == "≤ 20" and tails.fmtBound(math.inf) == "> last bucket"
    assert tails.quantileBound({"buckets": [], "count": 0, "sum": 0}, 0.5) is None


def test_addHistograms_sumsBucketByBucket() -> None:
    one = {"buckets": [[0.01, 5.0], [math.inf, 6.0]], "count": 6.0, "sum": 0.1}
    assert tails.addHistograms([one, None, one]) == {"buckets": [[0.01, 10.0], [math.inf, 12.0]], "count": 12.0,
                                                     "sum": 0.2}
    assert tails.addHistograms([None]) is None


def test_isStall_whenMaxIsAboveFiveTimesP50() -> None:
    assert tails.isStall(run(30.0, 60.0, 151.0))
    assert not tails.isStall(run(30.0, 60.0, 150.0))
    assert not tails.isStall({"p50Ms": 0.0, "maxMs": 5.0})


def canned() -> dict:
    results = cannedResults()
    lag = loopLagBetween(SCRAPE_BEFORE, SCRAPE_AFTER)["loopLag"]
    results["wrk"]["nonstream"]["64"]["service"] = [run(30.0, 55.0, 120.0, lag, gcSeconds={"2": 0.5}),
                                                    run(32.0, 205.0, 641.0, lag)]
    results["wrk"]["stream"]["64"]["service"] = [run(100.0, 180.0, 240.0, lag)]
    return results


def test_tailsSection_listsEveryRoundAndFlagsStalls() -> None:
    text = "\n".join(tails.tailsSection(canned(), [("service", "service")], report.MODES))
    assert "| Mode | Concurrency | Target | Round | req/s | p50 ms | p99 ms | p99.9 ms | max ms | max ÷ p50 |" in text
    assert "| Non-streaming | 64 | service | 1 | 1,000 | 30.0 | 55.0 | 87.5 | 120 | 4.0x | > 100 | 100 ms/s " \
           "|  |" in text
    assert "| Non-streaming | 64 | service | 2 | 1,000 | 32.0 | 205 | 423 | 641 | 20.0x | > 100 | n/a | " \
           "**stall** |" in text
    assert "| Streaming, 32 chunks | 64 | service | 1 |" in text
    flagged, rounds = text.count("| **stall** |"), text.count("\n| Non-streaming |") + text.count("\n| Streaming")
    assert f"({flagged} of {rounds} rounds)" in text and flagged >= 1


def test_lagSection_showsTheHistogramPerConcurrency() -> None:
    text = "\n".join(tails.lagSection(canned()))
    assert "| lag ≤ ms | c=1 | c=64 | all runs |" in text  # the canned run measured c=1 and c=64
    assert "| 5 | 0 | 900 | 900 |" in text  # three runs at c=64 with 300 samples <= 5 ms each
    assert "| 20 | 0 | 1470 | 1470 |" in text
    assert "| +Inf | 0 | 336 | 336 |" in text
    assert "| p50 / p99 / p99.9 | n/a | ≤ 20 / > 100 / > 100 | ≤ 20 / > 100 / > 100 |" in text
    assert "Not measured" in "\n".join(tails.lagSection(cannedResults()))


def test_tailGoalRows_judgeEveryRoundOfBothShapesAtTheHighestConcurrency() -> None:
    rows = {row[0]: row[1:] for row in tails.tailGoalRows(canned(), report.MODES)}
    assert rows["p99 ÷ p50 at concurrency 64, every round, both shapes"] == ["<= 2x", "worst 6.41x", "**no**"]
    assert rows["max at concurrency 64, every round, both shapes"] == ["<= 250 ms", "worst 641 ms", "**no**"]
    assert rows["rounds at concurrency 64 whose max > 5x p50"] == ["none", "non-streaming round 2", "**no**"]
    assert rows["event-loop lag p99.9 during the wrk runs (histogram bucket bound)"][1:] == ["> 100 ms", "**no**"]


def test_tailGoalRows_metWhenEveryRoundIsClose() -> None:
    results = cannedResults()
    quiet = {"buckets": [[0.005, 990.0], [0.02, 1000.0], [math.inf, 1000.0]], "count": 1000.0, "sum": 2.0}
    results["wrk"]["nonstream"]["64"]["service"] = [run(30.0, 50.0, 90.0, quiet), run(31.0, 52.0, 95.0, quiet)]
    results["wrk"]["stream"]["64"]["service"] = [run(100.0, 150.0, 200.0, quiet)]
    rows = tails.tailGoalRows(results, report.MODES)
    assert [row[-1] for row in rows] == ["yes", "yes", "yes", "yes"]
    assert rows[2][2] == "≤ 20 ms"


def test_renderReport_carriesTheTailsTheLagAndTheGoals() -> None:
    text = report.renderReport(canned())
    assert "## Tails per round (wrk; every round of every cell)" in text
    assert "## Event-loop lag of the service during the wrk runs" in text
    assert "| max at concurrency 64, every round, both shapes | <= 250 ms | worst 641 ms | **no** |" in text


def test_wrkSummaryWithP999() -> None:
    line = ('BENCHJSON {"requests":10,"duration_us":1000000,"bytes":1,"connect_errors":0,"read_errors":0,'
            '"write_errors":0,"status_errors":0,"timeouts":0,"p50_us":1000,"p90_us":2000,"p99_us":3000,'
            '"p999_us":4500,"mean_us":1200.0,"max_us":9000}')
    assert parseWrkOutput(line).p999Ms == 4.5
