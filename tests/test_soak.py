"""The soak (bench/soak.py): its judging of answers on canned data, and a 15-second smoke run of the real thing
(stub and service as processes, faults switched and the stub killed) whose JSON report must be clean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from bench.procs import MIB
from bench.report import keptSections
from bench.soak import (
    DOWN,
    ERROR_FRAME,
    KILLED,
    KIND_BY_NAME,
    NONE,
    Record,
    Timeline,
    bodyProblem,
    judge,
    rssSummary,
    sseOutcome,
)
from tests.conftest import REPO_ROOT, guardedEnv

SMOKE_TIMEOUT_SECONDS = 180


def sse(*payloads: object) -> list[str]:
    return [f"data: {p if isinstance(p, str) else orjson.dumps(p).decode()}" for p in payloads] + [""]


CONTENT = {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}


def test_sseOutcome_tellsCleanErrorFrameAndCutStreamsApart() -> None:
    assert sseOutcome(sse(CONTENT, "[DONE]")) == "200"
    assert sseOutcome(sse(CONTENT, {"error": {"message": "Ollama failed"}}, "[DONE]")) == ERROR_FRAME
    assert sseOutcome(sse(CONTENT)) == "200 cut"
    assert sseOutcome(sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, "[DONE]")) == "200 empty"
    assert sseOutcome(sse("not json", "[DONE]")) == "200 bad frame"


def test_bodyProblem_checksEnvelopeShapesAndRetryAfter() -> None:
    chat, embed = KIND_BY_NAME["chat"], KIND_BY_NAME["apiEmbed"]
    openAiError = orjson.dumps({"error": {"message": "busy", "type": "x", "code": "upstream_busy"}})
    assert bodyProblem(chat, "/v1/chat/completions", 503, httpx.Headers({"Retry-After": "2"}), openAiError) == ""
    assert bodyProblem(chat, "/v1/chat/completions", 503, httpx.Headers(), openAiError) == "no Retry-After"
    assert bodyProblem(chat, "/v1/chat/completions", 502, httpx.Headers(), b"oops") == "bad error body"
    assert bodyProblem(embed, "/api/embed", 502, httpx.Headers(), openAiError) == "bad error body"
    assert bodyProblem(chat, "/v1/chat/completions", 200, httpx.Headers(),
                       orjson.dumps({"choices": [{"message": {"content": ""}}]})) == "bad body"


def test_timeline_graceAroundSwitchesAcceptsBothSides() -> None:
    timeline = Timeline(grace=1.0)
    timeline.switch(10.0, "busy")
    timeline.switch(20.0, NONE)
    assert timeline.conditionsFor(5.0, 5.1) == {NONE}
    assert timeline.conditionsFor(9.5, 9.6) == {NONE, "busy"}
    assert timeline.conditionsFor(15.0, 17.0) == {"busy"}
    assert timeline.conditionsFor(20.5, 20.6) == {"busy", NONE}


def test_judge_streamsInFlightWhenTheStubDiesMayEndInAnErrorFrame() -> None:
    timeline = Timeline(grace=0.5)
    timeline.kill(10.0)
    timeline.switch(10.0, DOWN)
    timeline.switch(14.0, NONE)
    conditions, fine = judge(Record("chatStream", 9.0, 10.2, ERROR_FRAME, ""), timeline)
    assert conditions == {NONE, KILLED} and ERROR_FRAME in fine
    conditions, fine = judge(Record("chatStream", 12.0, 12.1, "503", ""), timeline)
    assert conditions == {DOWN} and fine == {"503"}
    assert ERROR_FRAME not in judge(Record("chatStream", 20.0, 20.2, ERROR_FRAME, ""), timeline)[1]
    assert judge(Record("wrongKey", 12.0, 12.1, "401", ""), timeline)[1] == {"401"}


def test_rssSummary_growthOverTheSecondHalf() -> None:
    samples = [{"atSeconds": at, "bytes": size * MIB, "treeBytes": 0}
               for at, size in ((0, 80), (30, 90), (60, 91), (90, 95), (120, 96))]
    summary = rssSummary(samples, 120.0)
    assert summary["secondHalfGrowthBytes"] == 5 * MIB  # 91 MiB at 60 s -> 96 MiB at the end
    assert (summary["startBytes"], summary["peakBytes"], summary["growthBytes"]) == (80 * MIB, 96 * MIB, 16 * MIB)


@pytest.mark.e2e
def test_soakSmoke_reportIsClean(tmp_path: Path) -> None:
    """15 s of load with two 4-second faults (seed 1: midstreamError, then the stub killed and kept down)."""
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "bench.soak", "--minutes", "0.25", "--phase-seconds", "4", "--grace", "1.5",
               "--seed", "1", "--concurrency", "8", "--rate", "30", "--no-pin", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=guardedEnv(dict(os.environ)), capture_output=True, text=True,
                            timeout=SMOKE_TIMEOUT_SECONDS)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = orjson.loads(out.read_bytes())
    assert report["requests"] > 0 and report["good"] > 0 and report["requests"] > report["good"]
    assert report["unexpected"]["count"] == 0, report["unexpected"]["examples"]
    assert report["held"]["count"] == 0, report["held"]["examples"]
    assert len(report["rss"]["samples"]) >= 2 and report["rss"]["startBytes"] > 0 and report["rss"]["endBytes"] > 0
    assert sum(report["faults"].values()) >= 2 and report["stubKills"] >= 1, report["faults"]
    judgedInFaults = set(report["goodByCondition"]) & {"midstreamError", "down"}
    assert judgedInFaults, report["goodByCondition"]  # some requests were judged by a fault's own statuses
    assert report["finalCheck"] == {"normalRequest": "200", "inFlight": 0, "serviceAlive": True, "ok": True}
    assert result.returncode == 0 and "Result: OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_benchReportKeepsTheSoakSection() -> None:
    """`make bench` rewrites docu/performance.md; the hand-written Soak section (up to the next ## heading) stays."""
    previous = ("# Performance\n\n## Memory\n\nold\n\n## Soak\n\nSoak text\n\n### 2-minute run\n\n- numbers\n\n"
                "## Notes\n")
    kept = keptSections(previous)
    assert kept == "\n## Soak\n\nSoak text\n\n### 2-minute run\n\n- numbers\n"
    assert keptSections("# Performance\n\n## Memory\n") == ""
