"""Throughput runs with wrk (Debian's wrk 4.x) and the parsing of its output.

The Lua script ``bench/wrk/post.lua`` POSTs one JSON body and prints a ``BENCHJSON {...}`` summary line with the
request count, duration, error counts and latency percentiles in microseconds; ``parseWrkOutput`` reads it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "post.lua"
SUMMARY_PREFIX = "BENCHJSON "
NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s*(\d+)")
WRK_TIMEOUT_SECONDS = 10
US_PER_MS = 1000.0


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed no summary."""


@dataclass(slots=True)
class WrkResult:
    """One wrk run: requests per second and latency percentiles in milliseconds."""

    requests: int
    seconds: float
    rps: float
    p50Ms: float
    p90Ms: float
    p99Ms: float
    p999Ms: float
    meanMs: float
    maxMs: float
    errors: int
    non2xx: int

    def asDict(self) -> dict[str, Any]:
        return asdict(self)


def parseWrkOutput(text: str) -> WrkResult:
    """The result of one run from wrk's stdout (needs the BENCHJSON line of bench/wrk/post.lua)."""
    summary = _summaryLine(text)
    seconds = summary["duration_us"] / 1e6
    non2xxMatch = NON_2XX_RE.search(text)
    non2xx = int(non2xxMatch.group(1)) if non2xxMatch else summary["status_errors"]
    socketErrors = sum(summary[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return WrkResult(requests=summary["requests"], seconds=round(seconds, 3),
                     rps=summary["requests"] / seconds if seconds > 0 else 0.0,
                     p50Ms=summary["p50_us"] / US_PER_MS, p90Ms=summary["p90_us"] / US_PER_MS,
                     p99Ms=summary["p99_us"] / US_PER_MS, p999Ms=summary.get("p999_us", summary["max_us"]) / US_PER_MS,
                     meanMs=summary["mean_us"] / US_PER_MS,
                     maxMs=summary["max_us"] / US_PER_MS, errors=socketErrors + non2xx, non2xx=non2xx)


def _summaryLine(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            return orjson.loads(line[len(SUMMARY_PREFIX):])
    raise WrkError("wrk printed no BENCHJSON summary line:\n" + text[-800:])


def wrkCommand(url: str, concurrency: int, seconds: float, core: int | None) -> list[str]:
    """The wrk command line: one thread (one core), ``concurrency`` keep-alive connections."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout",
               f"{WRK_TIMEOUT_SECONDS}s", "-s", str(WRK_SCRIPT), url]
    return (["taskset", "-c", str(core)] + command) if core is not None else command


def runWrk(url: str, bodyFile: Path, bearer: str, concurrency: int, seconds: float,
           core: int | None) -> WrkResult:
    """Run wrk once against ``url`` and parse its summary."""
    if shutil.which("wrk") is None:
        raise WrkError("wrk is not installed (Debian: apt-get install wrk)")
    env = {**os.environ, "BENCH_BODY_FILE": str(bodyFile), "BENCH_BEARER": bearer}
    completed = subprocess.run(wrkCommand(url, concurrency, seconds, core), env=env, capture_output=True,
                               text=True, timeout=seconds + WRK_TIMEOUT_SECONDS + 15)
    if completed.returncode != 0:
        raise WrkError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()[:400]}")
    return parseWrkOutput(completed.stdout)
