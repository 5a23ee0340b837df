"""Tail latency of the benchmark, per round and cell, and the service's event-loop lag (pure functions, tested in
tests/test_benchTails.py on canned results).

A wrk run of the service is bracketed by two scrapes of its /metrics; the difference of the ``event_loop_lag_seconds``
histogram (and of ``python_gc_pause_seconds``) is the lag (and GC time) of that run. The report shows every round of
every cell with p50, p99, p99.9 and max, flags a round whose max exceeds ``STALL_FACTOR`` times its p50, and shows the
lag histogram of the whole run.
"""

from __future__ import annotations

import math
from typing import Any

STALL_FACTOR = 5.0
"""A round whose max latency is above this many times its p50 had a stall."""
STALL_MARK = "**stall**"
LAG_METRIC = "event_loop_lag_seconds"
GC_METRIC = "python_gc_pause_seconds"
TAIL_P99_FACTOR_GOAL = 2.0
TAIL_MAX_GOAL_MS = 250.0
LAG_P999_GOAL_MS = 20.0
NA = "n/a"

Histogram = dict[str, Any]
"""``{"buckets": [[upper bound in s, cumulative count], ...], "count": n, "sum": seconds}``; +Inf as math.inf."""


def _number(text: str) -> float:
    return math.inf if text in ("+Inf", "Inf") else float(text)


def _labelValue(line: str, label: str) -> str | None:
    marker = f'{label}="'
    start = line.find(marker)
    if start < 0:
        return None
    start += len(marker)
    return line[start:line.index('"', start)]


def parseHistogram(text: str, name: str) -> Histogram:
    """One unlabelled histogram (``name``) from Prometheus text exposition."""
    buckets: list[list[float]] = []
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            buckets.append([_number(_labelValue(line, "le") or "+Inf"), float(line.rsplit(" ", 1)[1])])
        elif line.startswith(name + "_count "):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_sum "):
            total = float(line.rsplit(" ", 1)[1])
    return {"buckets": sorted(buckets), "count": count, "sum": total}


def gcSecondsByGeneration(text: str) -> dict[str, float]:
    """``python_gc_pause_seconds_sum`` per generation label."""
    sums = {}
    for line in text.splitlines():
        if line.startswith(GC_METRIC + "_sum{"):
            sums[_labelValue(line, "generation") or "?"] = float(line.rsplit(" ", 1)[1])
    return sums


def diffHistogram(before: Histogram, after: Histogram) -> Histogram:
    """What was recorded between two scrapes (bucket bounds of ``after``)."""
    earlier = {bound: count for bound, count in before.get("buckets", [])}
    return {"buckets": [[bound, count - earlier.get(bound, 0.0)] for bound, count in after["buckets"]],
            "count": after["count"] - before.get("count", 0.0), "sum": after["sum"] - before.get("sum", 0.0)}


def addHistograms(histograms: list[Histogram]) -> Histogram | None:
    present = [h for h in histograms if h and h.get("buckets")]
    if not present:
        return None
    bounds = sorted({bound for h in present for bound, _ in h["buckets"]})
    sums = {bound: sum(dict(map(tuple, h["buckets"])).get(bound, 0.0) for h in present) for bound in bounds}
    return {"buckets": [[bound, sums[bound]] for bound in bounds], "count": sum(h["count"] for h in present),
            "sum": sum(h["sum"] for h in present)}


def quantileBound(histogram: Histogram | None, quantile: float) -> float | None:
    """Upper bound (s) of the bucket that holds the ``quantile`` sample; math.inf beyond the last bound."""
    if not histogram or not histogram.get("count"):
        return None
    rank = quantile * histogram["count"]
    for bound, cumulative in histogram["buckets"]:
        if cumulative >= rank:
            return bound
    return math.inf


def fmtBound(seconds: float | None) -> str:
    if seconds is None:
        return NA
    if math.isinf(seconds):
        return "> last bucket"
    return f"≤ {seconds * 1000:g}"


def fmtQuantile(histogram: Histogram | None, quantile: float) -> str:
    """``≤ 20`` (ms, the bucket's upper bound), ``> 5000`` beyond the last finite bound, n/a without samples."""
    bound = quantileBound(histogram, quantile)
    if bound is not None and math.isinf(bound):
        finite = [b for b, _ in histogram["buckets"] if not math.isinf(b)] if histogram else []
        return f"> {finite[-1] * 1000:g}" if finite else fmtBound(bound)
    return fmtBound(bound)


def isStall(run: dict[str, Any]) -> bool:
    """The round's max latency is above STALL_FACTOR times its p50."""
    return bool(run.get("p50Ms")) and run.get("maxMs", 0.0) > STALL_FACTOR * run["p50Ms"]


def _ms(value: float | None) -> str:
    if value is None:
        return NA
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:,.{digits}f}"


def roundRows(results: dict[str, Any], targets: list[tuple[str, str]], modes: tuple[tuple[str, str], ...]
              ) -> list[list[str]]:
    """One row per mode, concurrency, target and round."""
    rows = []
    for mode, modeLabel in modes:
        for concurrency in results["meta"]["concurrencies"]:
            for target, label in targets:
                runs = (((results.get("wrk") or {}).get(mode) or {}).get(str(concurrency)) or {}).get(target) or []
                for index, run in enumerate(runs):
                    rows.append([modeLabel, str(concurrency), label, str(index + 1)] + _runCells(run))
    return rows


def _runCells(run: dict[str, Any]) -> list[str]:
    p50, maxMs = run.get("p50Ms"), run.get("maxMs")
    lag = run.get("loopLag")
    return [_ms(run.get("rps")), _ms(p50), _ms(run.get("p99Ms")), _ms(run.get("p999Ms")), _ms(maxMs),
            f"{maxMs / p50:.1f}x" if p50 and maxMs is not None else NA,
            fmtQuantile(lag, 0.999) if lag else NA, _gcCell(run.get("gcSeconds"), run.get("seconds")),
            STALL_MARK if isStall(run) else ""]


def _gcCell(gcSeconds: dict[str, float] | None, seconds: float | None) -> str:
    if not gcSeconds or not seconds:
        return NA
    return f"{sum(gcSeconds.values()) * 1000 / seconds:.0f} ms/s"


TAILS_HEADER = ["Mode", "Concurrency", "Target", "Round", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
                "max ÷ p50", "loop lag p99.9 ms", "cyclic GC", "flag"]


def tailsSection(results: dict[str, Any], targets: list[tuple[str, str]], modes: tuple[tuple[str, str], ...]
                 ) -> list[str]:
    rows = roundRows(results, targets, modes)
    flagged = sum(1 for row in rows if row[-1])
    lines = ["## Tails per round (wrk; every round of every cell)", "",
             f"{STALL_MARK}: the round's max is above {STALL_FACTOR:g}x its p50 ({flagged} of {len(rows)} rounds). "
             "Loop lag and cyclic GC are the service's own (`event_loop_lag_seconds`, `python_gc_pause_seconds` "
             "scraped before and after the run; lag as the upper bound of its histogram bucket).", ""]
    return lines + _table(TAILS_HEADER, rows) + [""]


def serviceLag(results: dict[str, Any], concurrency: int | None = None) -> Histogram | None:
    """The service's loop-lag histogram over its wrk runs (all, or one concurrency)."""
    runs = [run for byConcurrency in (results.get("wrk") or {}).values() for c, byTarget in byConcurrency.items()
            if concurrency is None or c == str(concurrency) for run in byTarget.get("service") or []]
    return addHistograms([run.get("loopLag") for run in runs])


def lagSection(results: dict[str, Any]) -> list[str]:
    """The service's event-loop lag histogram of the run, per concurrency and in total."""
    concurrencies = results["meta"]["concurrencies"]
    columns = [(str(c), serviceLag(results, c)) for c in concurrencies] + [("all", serviceLag(results))]
    total = columns[-1][1]
    lines = ["## Event-loop lag of the service during the wrk runs", ""]
    if total is None:
        return lines + ["Not measured (the service's /metrics was not scraped).", ""]
    header = ["lag ≤ ms"] + [f"c={name}" if name != "all" else "all runs" for name, _ in columns]
    rows, previous = [], {name: 0.0 for name, _ in columns}
    for bound, _ in total["buckets"]:
        row = ["+Inf" if math.isinf(bound) else f"{bound * 1000:g}"]
        for name, histogram in columns:
            cumulative = dict(map(tuple, histogram["buckets"])).get(bound, 0.0) if histogram else 0.0
            row.append(str(int(cumulative - previous[name])))
            previous[name] = cumulative
        rows.append(row)
    rows.append(["p50 / p99 / p99.9"] + [" / ".join(fmtQuantile(h, q) for q in (0.5, 0.99, 0.999)) if h else NA
                                         for _, h in columns])
    note = ("Samples of a task that sleeps 10 ms and records how late it wakes (`observe/loopLag.py`); under "
            "saturation one sample is about one loop iteration, i.e. the work of all requests that were ready at once.")
    return lines + _table(header, rows) + ["", note, ""]


def tailGoalRows(results: dict[str, Any], modes: tuple[tuple[str, str], ...]) -> list[list[str]]:
    """Issue 20's targets at the highest concurrency, every round of both shapes; lag over the whole run."""
    high = max(results["meta"]["concurrencies"])
    runs = [(f"{label.lower()} round {index + 1}", run) for mode, label in modes
            for index, run in enumerate((((results.get("wrk") or {}).get(mode) or {}).get(str(high)) or {})
                                        .get("service") or [])]
    if not runs:
        return []
    worstRatio = max(run["p99Ms"] / run["p50Ms"] for _, run in runs if run.get("p50Ms"))
    worstMax = max(run["maxMs"] for _, run in runs)
    lagP999 = quantileBound(serviceLag(results), 0.999)
    rows = [[f"p99 ÷ p50 at concurrency {high}, every round, both shapes", f"<= {TAIL_P99_FACTOR_GOAL:g}x",
             f"worst {worstRatio:.2f}x", _met(worstRatio <= TAIL_P99_FACTOR_GOAL)],
            [f"max at concurrency {high}, every round, both shapes", f"<= {TAIL_MAX_GOAL_MS:g} ms",
             f"worst {_ms(worstMax)} ms", _met(worstMax <= TAIL_MAX_GOAL_MS)]]
    rows.append(["event-loop lag p99.9 during the wrk runs (histogram bucket bound)", f"<= {LAG_P999_GOAL_MS:g} ms",
                 fmtQuantile(serviceLag(results), 0.999) + ("" if lagP999 is None else " ms"),
                 NA if lagP999 is None else _met(lagP999 * 1000 <= LAG_P999_GOAL_MS)])
    flagged = [name for name, run in runs if isStall(run)]
    rows.append([f"rounds at concurrency {high} whose max > {STALL_FACTOR:g}x p50", "none",
                 ", ".join(flagged) if flagged else "none", _met(not flagged)])
    return rows


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
