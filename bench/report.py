"""The benchmark report: aggregates the rounds of a run and renders docu/performance.md (pure functions, tested in
tests/test_bench.py on canned results)."""

from __future__ import annotations

from statistics import mean
from typing import Any

from bench import tails

TARGET_ORDER = ("service", "litellm", "direct")
MODES = (("nonstream", "Non-streaming"), ("stream", "Streaming, 32 chunks"))
MIB = 1024 * 1024
NA = "n/a"
ADDED_P50_GOAL_MS = 1.0
TTFB_GOAL_MS = 2.0
NONSTREAM_FACTOR_GOAL = 5.0
STREAM_FACTOR_GOAL = 10.0
P99_GOAL_MS = 100.0
RSS_GOAL_BYTES = 150_000_000
RSS_GROWTH_TOLERANCE_BYTES = 5 * MIB
STUB_FACTOR_RULE = 10.0
NOISY_OTHER_LOAD = 0.10
FEW_REQUESTS_FACTOR = 5
FEW_MARK = " †"
FEW_REQUESTS_NOTE = (f"{FEW_MARK.strip()} fewer than {FEW_REQUESTS_FACTOR} requests per connection completed: the work "
                     "of the requests still in flight at the end is counted too, so the CPU per request is overstated.")
PACING_TOLERANCE = 0.2
COALESCED_NOISE_SHARE = 0.05


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean of the numeric fields over rounds (errors summed); None when there are no rounds."""
    if not rounds:
        return None
    merged: dict[str, Any] = {"rounds": len(rounds)}
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [entry[key] for entry in rounds if key in entry]
            merged[key] = sum(values) if key in ("errors", "non2xx", "failed") else mean(values)
    return merged


def fmtNumber(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return NA
    if digits is None:
        digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:,.{digits}f}"


def fmtRatio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return NA
    return f"{numerator / denominator:.2f}x"


def difference(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else later - earlier


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def wrkAggregate(results: dict[str, Any], mode: str, concurrency: int, target: str) -> dict[str, Any] | None:
    return aggregate(_get(results, "wrk", mode, str(concurrency), target) or [])


def probeAggregate(results: dict[str, Any], concurrency: int, target: str) -> dict[str, Any] | None:
    return aggregate(_get(results, "probe", str(concurrency), target) or [])


def targetLabel(results: dict[str, Any], target: str) -> str:
    return _get(results, "targets", target, "label") or target


def activeTargets(results: dict[str, Any]) -> list[str]:
    return [t for t in TARGET_ORDER if t in (results.get("targets") or {})]


def throughputTable(results: dict[str, Any], mode: str) -> list[str]:
    header = ["Concurrency", "Target", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "server CPU ms/req",
              "server core use", "other load on that core", "rounds"]
    rows = []
    for concurrency in results["meta"]["concurrencies"]:
        for target in activeTargets(results):
            agg = wrkAggregate(results, mode, concurrency, target)
            rows.append([str(concurrency), targetLabel(results, target)] + _wrkCells(agg, concurrency))
    return _table(header, rows) + ["", FEW_REQUESTS_NOTE] if any(FEW_MARK in cell for row in rows for cell in row) \
        else _table(header, rows)


def _wrkCells(agg: dict[str, Any] | None, concurrency: int) -> list[str]:
    if agg is None:
        return [NA] * 9
    cpu = fmtNumber(agg.get("cpuMsPerRequest"), 3)
    if agg.get("requests", FEW_REQUESTS_FACTOR * concurrency) < FEW_REQUESTS_FACTOR * concurrency:
        cpu += FEW_MARK
    return [fmtNumber(agg["rps"], 0), fmtNumber(agg["p50Ms"]), fmtNumber(agg["p90Ms"]), fmtNumber(agg["p99Ms"]),
            str(int(agg["errors"])), cpu, fmtPercent(agg.get("cpuShare")), fmtPercent(agg.get("otherLoad")),
            str(agg["rounds"])]


def fmtPercent(value: float | None) -> str:
    return NA if value is None else f"{value:.0%}"


def ratioTable(results: dict[str, Any]) -> list[str]:
    header = ["Mode", "Concurrency", "service ÷ direct (req/s)", "service ÷ LiteLLM (req/s)",
              "added p50 ms vs direct", "added p99 ms vs direct", "LiteLLM ÷ direct (req/s)",
              "CPU per request: LiteLLM ÷ service"]
    rows = []
    for mode, modeLabel in MODES:
        for concurrency in results["meta"]["concurrencies"]:
            ours, lite, direct = (wrkAggregate(results, mode, concurrency, t) for t in TARGET_ORDER)
            rows.append([modeLabel, str(concurrency), fmtRatio(_val(ours, "rps"), _val(direct, "rps")),
                         fmtRatio(_val(ours, "rps"), _val(lite, "rps")),
                         fmtNumber(difference(_val(ours, "p50Ms"), _val(direct, "p50Ms"))),
                         fmtNumber(difference(_val(ours, "p99Ms"), _val(direct, "p99Ms"))),
                         fmtRatio(_val(lite, "rps"), _val(direct, "rps")),
                         fmtRatio(_val(lite, "cpuMsPerRequest"), _val(ours, "cpuMsPerRequest"))])
    return _table(header, rows)


def _val(agg: dict[str, Any] | None, key: str) -> float | None:
    return None if agg is None else agg.get(key)


PROBE_NOTE = ("First byte: for the service the OpenAI role frame it sends before any upstream content, for the "
              "upstream its first content chunk, so the two are not alike. First content: the first line carrying "
              "a content piece, for every target; the TTFB goal uses it.")


def probeTable(results: dict[str, Any]) -> list[str]:
    header = ["Concurrency", "Target", "first byte p50 ms", "first byte p99 ms", "first content p50 ms",
              "first content p99 ms", "total p50 ms", "total p99 ms", "streams/s (probe)", "content lines/stream",
              "first byte p50 added vs direct", "first content p50 added vs direct"]
    rows = []
    for concurrency in results["meta"]["concurrencies"]:
        direct = probeAggregate(results, concurrency, "direct")
        for target in activeTargets(results):
            agg = probeAggregate(results, concurrency, target)
            added = [NA if target == "direct" else fmtNumber(difference(_val(agg, key), _val(direct, key)))
                     for key in ("ttfbP50Ms", "contentP50Ms")]
            rows.append([str(concurrency), targetLabel(results, target)] + _probeCells(agg) + added)
    return _table(header, rows) + ["", PROBE_NOTE]


def _probeCells(agg: dict[str, Any] | None) -> list[str]:
    if agg is None:
        return [NA] * 8
    return [fmtNumber(agg["ttfbP50Ms"]), fmtNumber(agg["ttfbP99Ms"]), fmtNumber(agg.get("contentP50Ms")),
            fmtNumber(agg.get("contentP99Ms")), fmtNumber(agg["totalP50Ms"]), fmtNumber(agg["totalP99Ms"]),
            fmtNumber(agg["streamsPerSecond"], 0), fmtNumber(agg["contentLines"], 1)]


def pacingRuns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(results key, concurrency label) of the pacing checks: sequential streams, then concurrent ones."""
    return [("pacing", "1"), ("pacingConcurrent", str(results["meta"].get("pacingConcurrency", NA)))]


def pacingTable(results: dict[str, Any]) -> list[str]:
    header = ["Concurrency", "Target", "streams", "content chunks/stream", "gap p10 ms", "gap p50 ms", "gap p90 ms",
              "coalesced gaps (< ¼ pacing)", "share coalesced"]
    rows = []
    for key, concurrency in pacingRuns(results):
        for target in activeTargets(results):
            gaps = _get(results, key, target)
            if not gaps or "gaps" not in gaps:
                rows.append([concurrency, targetLabel(results, target)] + [NA] * 7)
                continue
            rows.append([concurrency, targetLabel(results, target), str(gaps["streams"]),
                         fmtNumber(gaps["chunksPerStream"], 1), fmtNumber(gaps["gapP10Ms"]),
                         fmtNumber(gaps["gapP50Ms"]), fmtNumber(gaps["gapP90Ms"]),
                         f"{gaps['coalesced']} of {gaps['gaps']}", fmtPercent(_coalescedShare(gaps))])
    return _table(header, rows)


def _coalescedShare(gaps: dict[str, Any]) -> float:
    return gaps.get("coalescedShare", gaps["coalesced"] / gaps["gaps"] if gaps["gaps"] else 0.0)


def fmtMiB(value: int | None) -> str:
    return NA if not value else f"{value / MIB:.1f}"


def memoryTable(results: dict[str, Any]) -> list[str]:
    header = ["Process", "idle (after start) MiB", "200 open streams MiB", "streams open / completed",
              "after round 1 MiB", "after run MiB", "growth idle → after run MiB",
              "growth after round 1 → after run MiB"]
    rows = []
    for target in ("service", "litellm"):
        memory = _get(results, "memory", target)
        if not memory:
            continue
        held = memory.get("streams") or {}
        roundsRss = memory.get("rounds") or []
        rows.append([targetLabel(results, target), fmtMiB(memory.get("idle")), fmtMiB(held.get("sample")),
                     f"{held.get('startedAtSample', NA)} / {held.get('completed', NA)}" if held else NA,
                     fmtMiB(roundsRss[0] if roundsRss else None), fmtMiB(memory.get("after")),
                     _fmtGrowth(memory.get("idle"), memory.get("after")),
                     _fmtGrowth(roundsRss[0] if roundsRss else None, memory.get("after"))])
    return _table(header, rows)


def _fmtGrowth(before: int | None, after: int | None) -> str:
    return NA if not before or not after else f"{(after - before) / MIB:+.1f}"


def goalRows(results: dict[str, Any]) -> list[list[str]]:
    """Each goal of the issue with the measured value and whether it is met (n/a when not measured)."""
    concurrencies = results["meta"]["concurrencies"]
    low, high = min(concurrencies), max(concurrencies)
    ours1 = wrkAggregate(results, "nonstream", low, "service")
    direct1 = wrkAggregate(results, "nonstream", low, "direct")
    addedP50 = difference(_val(ours1, "p50Ms"), _val(direct1, "p50Ms"))
    rows = [_goal(f"added p50 at concurrency {low}, non-streaming", addedP50, f"<= {ADDED_P50_GOAL_MS:g} ms",
                  lambda v: v <= ADDED_P50_GOAL_MS, " ms")]
    for mode, factor in (("nonstream", NONSTREAM_FACTOR_GOAL), ("stream", STREAM_FACTOR_GOAL)):
        ours, lite = wrkAggregate(results, mode, high, "service"), wrkAggregate(results, mode, high, "litellm")
        ratio = _val(ours, "rps") / _val(lite, "rps") if _val(ours, "rps") and _val(lite, "rps") else None
        rows.append(_goal(f"req/s at concurrency {high}, {dict(MODES)[mode].lower()}, ÷ LiteLLM", ratio,
                          f">= {factor:g}x", lambda v, f=factor: v >= f, "x"))
    p99 = _val(wrkAggregate(results, "nonstream", high, "service"), "p99Ms")
    rows.append(_goal(f"p99 at concurrency {high}, non-streaming", p99, f"<= {P99_GOAL_MS:g} ms",
                      lambda v: v <= P99_GOAL_MS, " ms"))
    ours, direct = probeAggregate(results, low, "service"), probeAggregate(results, low, "direct")
    content = difference(_val(ours, "contentP50Ms"), _val(direct, "contentP50Ms"))
    rows.append(_goal(f"streaming TTFB overhead at concurrency {low} (p50, first content line)", content,
                      f"<= {TTFB_GOAL_MS:g} ms", lambda v: v <= TTFB_GOAL_MS, " ms"))
    firstByte = difference(_val(ours, "ttfbP50Ms"), _val(direct, "ttfbP50Ms"))
    rows.append(_goal(f"first byte at concurrency {low} (p50; the service's role frame vs the upstream's first "
                      "content, for information)", firstByte, "reported", None, " ms"))
    rows.extend(tails.tailGoalRows(results, MODES))
    rows.extend(_pacingGoal(results))
    rows.extend(_memoryGoals(results))
    return rows


def _goal(name: str, value: float | None, goal: str, check: Any, unit: str) -> list[str]:
    if value is None:
        return [name, goal, NA, NA]
    if check is None:
        return [name, goal, fmtNumber(value) + unit, "—"]
    return [name, goal, fmtNumber(value) + unit, "yes" if check(value) else "**no**"]


def _pacingGoal(results: dict[str, Any]) -> list[list[str]]:
    return [_pacingGoalAt(results, key, concurrency) for key, concurrency in pacingRuns(results)]


def _pacingGoalAt(results: dict[str, Any], key: str, concurrency: str) -> list[str]:
    name = f"no coalescing of streamed chunks at concurrency {concurrency}"
    ours, direct = _get(results, key, "service"), _get(results, key, "direct")
    if not ours or "gaps" not in ours or not direct or "gaps" not in direct:
        return [name, "gaps as upstream's", NA, NA]
    measured = f"{ours['coalesced']} of {ours['gaps']} gaps coalesced ({fmtPercent(_coalescedShare(ours))}), " \
               f"p50 {fmtNumber(ours['gapP50Ms'])} ms (upstream {fmtNumber(direct['gapP50Ms'])} ms)"
    return [name, "gaps as upstream's", measured, "yes" if notCoalesced(ours, direct) else "**no**"]


def notCoalesced(ours: dict[str, Any], direct: dict[str, Any]) -> bool:
    """Every chunk arrives on its own with the upstream's pacing. A few bunched gaps are scheduling noise on a busy
    machine; a gateway that buffers shows fewer chunks, a median gap off the pacing, or many bunched gaps."""
    sameChunks = ours["chunksPerStream"] >= direct["chunksPerStream"]
    samePacing = abs(ours["gapP50Ms"] - direct["gapP50Ms"]) <= PACING_TOLERANCE * direct["gapP50Ms"]
    fewBunched = ours["coalesced"] <= max(direct["coalesced"], COALESCED_NOISE_SHARE * ours["gaps"])
    return sameChunks and samePacing and fewBunched


def _memoryGoals(results: dict[str, Any]) -> list[list[str]]:
    memory = _get(results, "memory", "service") or {}
    held = (memory.get("streams") or {}).get("sample")
    rows = [_goal("service RSS with 200 open streams", held / 1e6 if held else None, "<= 150 MB",
                  lambda v: v <= RSS_GOAL_BYTES / 1e6, " MB")]
    roundsRss, after, idle = memory.get("rounds") or [], memory.get("after"), memory.get("idle")
    growth = (after - roundsRss[0]) / MIB if roundsRss and after else None
    rows.append(_goal("service RSS growth, after round 1 → after run (leak check)", growth, "≈ 0 (<= 5 MiB)",
                      lambda v: v * MIB <= RSS_GROWTH_TOLERANCE_BYTES, " MiB"))
    fromIdle = (after - idle) / MIB if idle and after else None
    rows.append(_goal("service RSS growth, idle → after run (includes warm-up: imports, pools, caches)", fromIdle,
                      "reported", None, " MiB"))
    return rows


def extraSection(name: str, title: str, data: Any) -> list[str]:
    """A colleague's bench module result (PDF, STT): its own markdown if it brings one, else a key/value table."""
    lines = [f"## {title}", ""]
    if not data:
        return lines + [f"Not measured: `bench/{name}.py` is not there yet.", ""]
    if "error" in data and len(data) == 1:
        return lines + [f"Not measured: {data['error']}", ""]
    if isinstance(data.get("markdown"), str):
        return lines + [data["markdown"].strip(), ""]
    listed = {key: value for key, value in data.items() if _isListOfDicts(value)}
    rows = [[str(key), _plain(value)] for key, value in _flatten({k: v for k, v in data.items() if k not in listed})]
    lines += _table(["Measure", "Value"], rows) + [""]
    for key, value in listed.items():
        lines += [f"`{key}`:", ""] + _listTable(value) + [""]
    return lines


def _isListOfDicts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _listTable(items: list[dict[str, Any]]) -> list[str]:
    flattened = [dict(_flatten(item)) for item in items]
    columns = list(dict.fromkeys(key for item in flattened for key in item))
    return _table(columns, [[_plain(item.get(column, "")) for column in columns] for item in flattened])


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return fmtNumber(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def renderReport(results: dict[str, Any]) -> str:
    """docu/performance.md for one run."""
    meta = results["meta"]
    lines = _headerLines(results)
    lines += ["## Goals of the issue (measured in this run)", ""]
    lines += _table(["Goal", "Target", "Measured", "Met"], goalRows(results)) + [""]
    for mode, modeLabel in MODES:
        lines += [f"## {modeLabel} `/v1/chat/completions` (wrk, {meta['wrkSeconds']:g} s per run)", ""]
        lines += throughputTable(results, mode) + [""]
    lines += tails.tailsSection(results, [(t, targetLabel(results, t)) for t in activeTargets(results)], MODES)
    lines += tails.lagSection(results)
    lines += ["## Ratios (service against the limit and the anchor; means over rounds)", ""]
    lines += ratioTable(results) + [""]
    lines += [f"## Streaming latency: time to first byte and total ({meta['probeSeconds']:g} s per run, "
              "raw-asyncio probe client)", ""]
    lines += probeTable(results) + [""]
    lines += [f"## Chunk pacing (upstream paces {meta['pacingDelayMs']:g} ms between chunks; "
              f"{meta['pacingStreams']} sequential streams per target at concurrency 1, 2 streams on each of "
              f"{meta.get('pacingConcurrency', NA)} connections at concurrency {meta.get('pacingConcurrency', NA)})",
              ""]
    lines += pacingTable(results) + [""]
    lines += ["## Memory (VmRSS from /proc)", ""]
    lines += memoryTable(results) + [""]
    lines += extraSection("benchPdf", "PDF analysis (`/api/analyze`)", (results.get("extra") or {}).get("pdf"))
    lines += extraSection("benchStt", "Speech to text", (results.get("extra") or {}).get("stt"))
    lines += extraSection("sttLanguages", "Speech to text in the users' languages (detection, WER, real-time factor)",
                          (results.get("extra") or {}).get("sttLanguages"))
    lines += extraSection("benchAdmission", "Admission control and fair sharing (one GPU, 2 slots)",
                          (results.get("extra") or {}).get("admission"))
    lines += extraSection("benchMixed", "Mixed traffic on a realistic Ollama stand-in (model reloads must be 0)",
                          (results.get("extra") or {}).get("mixed"))
    lines += extraSection("benchLoopStalls", "Event-loop stalls from heavy request work (issue 17)",
                          (results.get("extra") or {}).get("stalls"))
    lines += extraSection("benchInstances", "Several workers and shared state in Redis",
                          (results.get("extra") or {}).get("instances"))
    lines += extraSection("benchUpstreams", "Several GPU servers (upstreams)",
                          (results.get("extra") or {}).get("upstreams"))
    lines += HOT_PATH_HISTORY.splitlines() + [""]
    lines += _notesLines(results)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> None:
    """``python -m bench.report <results.json> [output.md]``: render a saved run again (bench/results/)."""
    from pathlib import Path

    import orjson

    results = orjson.loads(Path(argv[0]).read_bytes())
    text = renderReport(results)
    if len(argv) > 1:
        Path(argv[1]).write_text(text, encoding="utf-8")
    else:
        print(text)



def _headerLines(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    labels = [targetLabel(results, t) for t in activeTargets(results)]
    lines = ["# Performance", "",
             "Overhead of the service against calling the Ollama-compatible upstream directly (the limit) and against "
             f"LiteLLM proxy {meta.get('litellmVersion') or NA} (the anchor), measured side by side in one run. "
             "Written by `make bench` (bench/run.py); do not edit by hand.", "",
             f"- Date: {meta['date']}",
             f"- Machine: {meta['nproc']} cores ({meta['cpuModel']}), {meta['memGiB']:.0f} GiB RAM, {meta['kernel']}, "
             f"Python {meta['python']}",
             f"- Command: `{meta['command']}` (git {meta['gitCommit']}); whole run {meta['elapsedSeconds']:.0f} s",
             f"- Pinning: {meta['pinning']}",
             f"- Upstream: {meta['upstream']}",
             f"- Upstream choice: {upstreamChoice(results)}",
             f"- Rounds: {meta['rounds']} per measurement, alternating {' / '.join(labels)} within each round "
             "(A/B/A/B); tables show the mean over rounds",
             f"- Load generator: wrk ({meta['wrkVersion']}) with bench/wrk/post.lua, 1 thread, keep-alive",
             f"- Other load: load average {meta.get('loadBefore', NA)} before and {meta.get('loadAfter', NA)} after "
             f"the run; {otherLoadSummary(results)}"]
    for target in activeTargets(results):
        note = _get(results, "targets", target, "note")
        if note:
            lines.append(f"- {targetLabel(results, target)}: {note}")
    return lines + [""]


HOT_PATH_HISTORY = """## Hot-path changes measured with this harness

A/B runs (same build, variants side by side, alternating, wrk on the other core), non-streaming
`/v1/chat/completions` at concurrency 64 unless noted; CPU = the server's CPU time per request.

| Change | Before | After |
|---|---|---|
| Lean HTTP/1.1 upstream transport instead of httpcore's pool (`upstream/transport.py`; httpcore polled every \
pooled socket on each request, so the cost grew with concurrency) | 358 req/s, p99 677 ms, 2.7 ms CPU/req \
(c=16: 2.3, c=1: 1.2) | 1,450-1,520 req/s, p99 ~177 ms, 0.66-0.69 ms CPU/req |
| Disconnect watcher ends with the response instead of being cancelled (`core/clientDisconnect.py`; each cancel left \
a CancelledError/traceback/frame cycle of ~40 objects for the cyclic GC) | 0.78-0.83 ms CPU/req, ~50 cyclic \
objects/request, gen2 GC 2.4 s per 15 s | 0.67-0.70 ms CPU/req, ~11 cyclic objects/request, gen2 GC 1.7 s |
| `gc.freeze()` of the start-up objects in `python app.py` (full collections scan ~13k instead of ~85k \
objects) | p99 116-321 ms, 0.67-0.70 ms CPU/req, gen2 GC 1.7 s per 15 s, pauses up to ~100-170 ms | p99 57-133 ms, \
0.57-0.60 ms CPU/req, gen2 GC 0.24 s |
| uvloop whose TCP server accepts every waiting connection at once (`core/eventLoop.py`; libuv >= 1.45 accepts one \
per loop iteration, so the first request of the k-th new connection waited k busy iterations) | c=64, both builds in \
one run alternating, busy machine: max 3.9-5.0 s, p99 3.0-4.3 s | max 0.6-1.8 s, p99 0.5-1.8 s (same noise) |
| `OllamaClient` calls `upstream/transport.py` directly (`UpstreamTransport.send`) instead of through \
`httpx.AsyncClient`; a stream reads the end of Ollama's chunked body after its done line so the connection is kept \
| client alone at c=64 (`bench/transportAb.py`): 0.41-0.49 ms CPU per call, 0.78-0.87 per 32-line stream; a new \
upstream connection per stream | 0.08 ms per call, 0.28-0.29 per stream (aiohttp's ClientSession: 0.27 / 0.43-0.48); \
streams reuse their connection |
| Cyclic GC thresholds (10000, 10, 10) instead of (700, 10, 10) in `python app.py` (`GC_THRESHOLDS`) | c=64, 20 s \
of load: GC 540-550 ms CPU (gen 0/1/2: 650-720 / 58-64 / 6 collections) | 73-79 ms (20 / 1 / 1); longest collection \
~15 ms CPU either way |
| Ollama NDJSON stream read as raw bytes split on newlines instead of `httpx.Response.aiter_lines()` \
(`upstream/ollamaClient.py`; no str decoding and no line-splitting state machine per chunk) | quick smoke: \
≈1.65 ms CPU per 32-chunk stream, 600 req/s streaming at c=1 | ≈1.27 ms CPU per stream, 786 req/s streaming at c=1 |

Suggested next, not applied: sending the frames of all upstream lines that have already arrived in one write
(nothing waits for more, so paced chunks are not coalesced; an earlier A/B at concurrency 16 cut the CPU per stream
by about a third); merging the small middlewares (request context, access log, limits) into one. The current CPU
per streamed request is in the streaming table above.
"""


KEPT_SECTIONS = ("## Stalls under load (issue 20)", "## Upstream client: our transport against aiohttp", "## Soak")
"""Sections of docu/performance.md written from other tools' runs (bench/soak.py) that a new report keeps."""


def keptSections(previous: str) -> str:
    """The KEPT_SECTIONS of the previous report (each up to the next ``## `` heading), to append to a new one."""
    lines, kept = previous.splitlines(), []
    for index, line in enumerate(lines):
        if line.strip() in KEPT_SECTIONS:
            end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
            kept.append("\n".join(lines[index:end]).rstrip())
    return "".join(f"\n{section}\n" for section in kept)


def fastestGatewayRate(results: dict[str, Any]) -> tuple[float, str] | None:
    """The highest mean req/s any gateway (service, LiteLLM) reached in any wrk run, with where."""
    best = None
    for mode, byConcurrency in (results.get("wrk") or {}).items():
        for concurrency, byTarget in byConcurrency.items():
            for target in ("service", "litellm"):
                agg = aggregate(byTarget.get(target) or [])
                if agg and (best is None or agg["rps"] > best[0]):
                    best = (agg["rps"], f"{targetLabel(results, target)}, {mode}, c={concurrency}")
    return best


def upstreamChoice(results: dict[str, Any]) -> str:
    """The rule for the upstream and the measured numbers that decided it (the stub is measured first)."""
    stub, fastest = results.get("stub"), fastestGatewayRate(results)
    rule = f"an upstream must serve >= {STUB_FACTOR_RULE:g}x the fastest gateway's rate, or it is the bottleneck"
    if not stub or fastest is None:
        return f"{rule}; the test stub tests/ollamaStub.py was not measured in this run (BENCH_QUICK / BENCH_SKIP_STUB)"
    stubRate = max(stub["nonstream"], stub["stream"])
    direct = max((_val(wrkAggregate(results, mode, c, "direct"), "rps") or 0.0
                  for mode, _ in MODES for c in results["meta"]["concurrencies"]), default=0.0)
    verdict = "meets" if stubRate >= STUB_FACTOR_RULE * fastest[0] else "fails"
    return (f"{rule}. Measured first: tests/ollamaStub.py (uvicorn ASGI) served {fmtNumber(stub['nonstream'], 0)} "
            f"req/s non-streaming and {fmtNumber(stub['stream'], 0)} streaming at concurrency {stub['concurrency']} "
            f"on one core = {stubRate / fastest[0]:.1f}x the fastest gateway ({fmtNumber(fastest[0], 0)} req/s, "
            f"{fastest[1]}): it {verdict} the rule; bench/instantUpstream.py served up to {fmtNumber(direct, 0)} "
            f"req/s = {direct / fastest[0]:.1f}x, so the bench uses "
            f"{'it' if verdict == 'fails' else 'it (the stub would also do)'}")


def _notesLines(results: dict[str, Any]) -> list[str]:
    notes = results.get("notes") or []
    if not notes:
        return []
    return ["## Notes", ""] + [f"- {note}" for note in notes] + [""]


def otherLoadSummary(results: dict[str, Any]) -> str:
    """How much of the server core other processes took during the wrk runs (noise indicator)."""
    shares = [run.get("otherLoad", 0.0) for mode in (results.get("wrk") or {}).values()
              for byTarget in mode.values() for runs in byTarget.values() for run in runs]
    if not shares:
        return "no wrk runs"
    text = f"other processes took {mean(shares):.0%} of the server core on average during the wrk runs " \
           f"(max {max(shares):.0%})"
    if mean(shares) > NOISY_OTHER_LOAD:
        text += "; **the machine was busy, so req/s and latencies are noisy — compare the CPU ms per request**"
    return text


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
