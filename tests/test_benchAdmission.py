"""bench/benchAdmission.py's arithmetic on canned timings (the benchmark itself runs in `make bench`)."""

from __future__ import annotations

import pytest

from bench.benchAdmission import Timing, reportMarkdown, utilisation


def test_utilisationCountsGenerationInsideTheWindowOverBothSlots() -> None:
    timings = [Timing("B", 200, 0.0, firstToken=1.1, end=3.0),  # generating 1.0 .. 3.0
               Timing("B", 200, 0.0, firstToken=2.1, end=6.0),  # 2.0 .. 6.0, clipped to 4.0
               Timing("B", 503, 0.0),  # refused: no generation
               Timing("B", 200, 0.0, firstToken=3.6)]  # still streaming at the end: 3.5 .. 4.0
    assert utilisation(timings, 1.0, 4.0, 0.1) == pytest.approx((2.0 + 2.0 + 0.5) / (2 * 3.0))


def test_reportSaysWhetherEachGoalWasMet() -> None:
    fair = {"order": "fair", "aRequests": 12, "aFailed": 0, "idleTtftP50Ms": 40.0, "ttftP50Ms": 300.0,
            "ttftP95Ms": 500.0, "ttftMaxMs": 520.0, "bCompleted": 30, "utilisation": 0.985, "windowSeconds": 9.0}
    fifo = {**fair, "order": "fifo", "ttftP50Ms": 16000.0, "ttftP95Ms": 17000.0}
    overload = {"requests": 50, "refused503": 50, "p50Ms": 3.0, "p99Ms": 9.0, "maxMs": 12.0, "retryAfter": ["8"]}
    text = reportMarkdown({"slots": 2, "tokens": 15, "tokenMs": 33.0, "flood": 64, "generationSeconds": 0.495,
                           "fairness": [fair, fifo], "overload": {"sequential": overload, "burst": overload},
                           "loadAverage": [1.0, 2.0]})
    assert "| fair (12 A requests) | 40 ms | 300 ms | 500 ms | 520 ms | 802 ms: met | 98.5% | 30 |" in text
    assert "| fifo (12 A requests) | 40 ms | 16000 ms | 17000 ms | 520 ms | 802 ms: missed |" in text
    assert text.count("50 got 503") == 2 and "within 50 ms: met" in text and "Retry-After 8 s" in text
