"""Admission control benchmark (issue 16): the service in front of the Ollama stub run as a one-GPU stand-in
(2 slots like OLLAMA_NUM_PARALLEL=2, ~30 tokens/s per request, requests beyond the slots wait inside the stub
without a byte, as Ollama's do).

- Fairness: key B keeps 64 chat streams in flight while key A sends one stream at a time. A's time to first token
  (TTFT) with the fair queue and with FIFO (``[ollama] queue_order``), against the goal
  p95 <= 1.5 x (A's idle TTFT + one request's generation time).
- Throughput: slot-time the stand-in spent generating while B's flood kept work queued, over 2 slots x the window
  (each request's generation is taken as first token - one token interval .. last byte, seen by the client).
- Overload: 2 slots busy and ``max_queue`` (8) waiting; 50 more requests at once must get 503 within 50 ms.

Run:  python -m bench.benchAdmission   (prints markdown; ``main()`` returns a dict with it under "markdown")
Environment: BENCH_QUICK=1 (fewer samples), BENCH_ADMISSION_TOKENS (15 per answer), BENCH_ADMISSION_TOKEN_MS (33),
BENCH_ADMISSION_FLOOD (64), BENCH_ADMISSION_A_REQUESTS (12; FIFO gets a third, each waits the whole flood).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.procs import BenchProcess, freePort
from bench.streamProbe import percentile

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "poweron-text-general"
STUB_MODEL = "qwen2.5:7b"
SLOTS = 2
OVERLOAD_QUEUE = 8
OVERLOAD_EXTRA = 50
OVERLOAD_GOAL_MS = 50.0
START_TIMEOUT_SECONDS = 60
REPLY_TEXT = "token " * 1000
"""Long enough that every chunk the stub sends is whole words (it splits a short text into fewer pieces)."""


def _option(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass
class Setup:
    tokens: int
    tokenMs: float
    flood: int
    aRequests: int
    quick: bool

    @property
    def generationSeconds(self) -> float:
        return self.tokens * self.tokenMs / 1000.0


@dataclass
class Timing:
    key: str
    status: int
    start: float
    firstToken: float | None = None
    end: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.firstToken is None else self.firstToken - self.start


class Rig:
    """The stub (2 slots, paced tokens) and one service process; keys A (interactive) and B (batch)."""

    def __init__(self, workDir: Path, setup: Setup) -> None:
        self.workDir, self.setup = workDir, setup
        self.keys = {"A": secrets.token_urlsafe(32), "B": secrets.token_urlsafe(32)}
        self.stub: BenchProcess | None = None
        self.service: BenchProcess | None = None
        self.baseUrl = ""
        self.logPath = workDir / "service.log"

    def startStub(self) -> str:
        port = freePort()
        command = [sys.executable, "-m", "tests.ollamaStub", "--port", str(port), "--models", STUB_MODEL,
                   "--no-record", "--chunks", str(self.setup.tokens), "--chunk-delay-ms", str(self.setup.tokenMs),
                   "--max-parallel", str(SLOTS), "--reply-text", REPLY_TEXT]
        self.stub = BenchProcess("stub", command, dict(os.environ), 1, self.workDir / "stub.log", REPO_ROOT).start()
        self.stub.waitForHttp(f"http://127.0.0.1:{port}/api/version", START_TIMEOUT_SECONDS)
        return f"http://127.0.0.1:{port}"

    def startService(self, stubUrl: str, order: str, maxQueue: int, logLevel: str = "warning") -> None:
        port = freePort()
        ini = self.workDir / f"service-{order}-{maxQueue}.ini"
        self.logPath = self.workDir / f"service-{order}-{maxQueue}.log"
        ini.write_text(
            f"[server]\nhost = 127.0.0.1\nport = {port}\nlog_level = {logLevel}\ngraceful_shutdown_seconds = 1\n\n"
            f"[ollama]\nbase_url = {stubUrl}\nnum_parallel = {SLOTS}\nmax_queue = {maxQueue}\n"
            f"max_queue_wait_seconds = 600\nqueue_order = {order}\n\n"
            f"[auth]\napi_keys = gateway={secrets.token_urlsafe(32)}\n"
            f"openai_keys = interactive={self.keys['A']}, batch={self.keys['B']}\n\n"
            f"[ratelimit]\nper_key = interactive=1000000/100000/1000, batch=1000000/100000/1000\n\n"
            f"[whisper]\nenabled = false\n\n[warmup]\nmodels =\n", encoding="utf-8")
        env = {key: value for key, value in os.environ.items() if not key.startswith("PRIVATE_LLM_")}
        env["PRIVATE_LLM_CONFIG"] = str(ini)
        self.service = BenchProcess(f"service-{order}", [sys.executable, "app.py"], env, 0, self.logPath,
                                    REPO_ROOT).start()
        self.baseUrl = f"http://127.0.0.1:{port}"
        self.service.waitForHttp(self.baseUrl + "/health/liveliness", START_TIMEOUT_SECONDS)
        waitForModel(self.baseUrl, self.keys["A"])

    def stopService(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def stop(self) -> None:
        self.stopService()
        if self.stub is not None:
            self.stub.stop()


def waitForModel(baseUrl: str, key: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        response = httpx.get(baseUrl + "/v1/models", headers={"Authorization": f"Bearer {key}"}, trust_env=False)
        if response.status_code == 200 and response.json()["data"]:
            return
        time.sleep(0.2)
    raise TimeoutError("the service never listed the stub's model")


def chatBody(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "Erzähl etwas."}]}


async def streamOnce(http: httpx.AsyncClient, key: str, token: str, sink: list[Timing] | None = None) -> Timing:
    """One chat stream; the time of its first content delta and of its last byte. With ``sink`` the timing is in
    it from the start, so a stream cancelled mid-answer still counts its generation so far."""
    timing = Timing(key, 0, time.monotonic())
    if sink is not None:
        sink.append(timing)
    async with http.stream("POST", "/v1/chat/completions", json=chatBody(True),
                           headers={"Authorization": f"Bearer {token}"}) as response:
        timing.status = response.status_code
        async for line in response.aiter_lines():
            if timing.firstToken is None and line.startswith("data: {") and _hasContent(line[6:]):
                timing.firstToken = time.monotonic()
    timing.end = time.monotonic()
    return timing


def _hasContent(data: str) -> bool:
    choices = orjson.loads(data).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def flood(http: httpx.AsyncClient, token: str, stop: asyncio.Event, done: list[Timing]) -> None:
    while not stop.is_set():
        await streamOnce(http, "B", token, done)


async def queuedNow(http: httpx.AsyncClient, token: str) -> int:
    """Calls waiting for a slot (the queues in /health are details: they need a key)."""
    queues = (await http.get("/health", headers={"Authorization": f"Bearer {token}"})).json().get("queues") or [{}]
    return sum(queue.get("queued", 0) for queue in queues)


def utilisation(timings: list[Timing], start: float, end: float, tokenSeconds: float) -> float:
    """Slot-seconds of generation inside [start, end] over SLOTS x (end - start); a stream still open at ``end``
    counts up to ``end``."""
    busy = 0.0
    for timing in timings:
        if timing.firstToken is None:
            continue
        begin = timing.firstToken - tokenSeconds
        busy += max(0.0, min(end, timing.end if timing.end is not None else end) - max(start, begin))
    return busy / (SLOTS * (end - start))


async def fairnessRun(rig: Rig, order: str, aRequests: int) -> dict[str, Any]:
    setup = rig.setup
    limits = httpx.Limits(max_connections=setup.flood + 16)
    async with httpx.AsyncClient(base_url=rig.baseUrl, timeout=900, limits=limits, trust_env=False) as http:
        idle = [await streamOnce(http, "A", rig.keys["A"]) for _ in range(3 if setup.quick else 6)][1:]
        stop, bTimings = asyncio.Event(), []
        workers = [asyncio.create_task(flood(http, rig.keys["B"], stop, bTimings)) for _ in range(setup.flood)]
        while await queuedNow(http, rig.keys["A"]) < setup.flood - SLOTS - 2:
            await asyncio.sleep(0.05)
        windowStart = time.monotonic()
        aTimings = [await streamOnce(http, "A", rig.keys["A"]) for _ in range(aRequests)]
        windowEnd = time.monotonic()
        stop.set()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    idleTtft = [t.ttft * 1000 for t in idle if t.ttft is not None]
    ttft = [t.ttft * 1000 for t in aTimings if t.ttft is not None]
    return {"order": order, "aRequests": len(ttft), "aFailed": sum(t.status != 200 for t in aTimings),
            "idleTtftP50Ms": percentile(idleTtft, 50), "ttftP50Ms": percentile(ttft, 50),
            "ttftP95Ms": percentile(ttft, 95), "ttftMaxMs": max(ttft, default=0.0),
            "bCompleted": sum(t.status == 200 and t.end is not None and windowStart <= t.end <= windowEnd
                              for t in bTimings),
            "utilisation": utilisation(bTimings + aTimings, windowStart, windowEnd, setup.tokenMs / 1000),
            "windowSeconds": windowEnd - windowStart}


async def overloadRun(rig: Rig, stubUrl: str) -> dict[str, Any]:
    """Fill the 2 slots and the queue of 8 with B's long streams (answers of 20 s), then A's requests: 50 one at a
    time and 50 at once, over connections opened beforehand (the time is the service's, not TCP set-up's)."""
    httpx.post(stubUrl + "/_stub/config", json={"chunks": int(20_000 / rig.setup.tokenMs)}, trust_env=False)
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=rig.baseUrl, timeout=900, limits=limits, trust_env=False) as http:
        await asyncio.gather(*(http.get("/health/liveliness") for _ in range(OVERLOAD_EXTRA)))
        holders = [asyncio.create_task(streamOnce(http, "B", rig.keys["B"])) for _ in range(SLOTS + OVERLOAD_QUEUE)]
        while await queuedNow(http, rig.keys["A"]) < OVERLOAD_QUEUE:
            await asyncio.sleep(0.02)
        sequential = [await _timedPost(http, rig.keys["A"]) for _ in range(OVERLOAD_EXTRA)]
        burst = await asyncio.gather(*(_timedPost(http, rig.keys["A"]) for _ in range(OVERLOAD_EXTRA)))
        baseline = [await _timedGet(http, rig.keys["A"]) for _ in range(OVERLOAD_EXTRA)]
        baselineBurst = await asyncio.gather(*(_timedGet(http, rig.keys["A"]) for _ in range(OVERLOAD_EXTRA)))
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    httpx.post(stubUrl + "/_stub/config", json={"chunks": rig.setup.tokens}, trust_env=False)
    return {"sequential": _overloadSummary(sequential), "burst": _overloadSummary(burst),
            "baselineSequential": _overloadSummary(baseline), "baselineBurst": _overloadSummary(baselineBurst)}


async def _timedGet(http: httpx.AsyncClient, token: str) -> tuple[int, float, str]:
    """GET /v1/models: the same key check and rate limit, no model call; the machine's floor for one request."""
    started = time.monotonic()
    response = await http.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    return response.status_code, (time.monotonic() - started) * 1000, ""


def _overloadSummary(answers: list[tuple[int, float, str]]) -> dict[str, Any]:
    latencies = [ms for _, ms, _ in answers]
    return {"requests": len(answers), "refused503": sum(status == 503 for status, _, _ in answers),
            "p50Ms": percentile(latencies, 50), "p99Ms": percentile(latencies, 99),
            "maxMs": max(latencies, default=0.0), "retryAfter": sorted({retry for _, _, retry in answers if retry})}


async def _timedPost(http: httpx.AsyncClient, token: str) -> tuple[int, float, str]:
    started = time.monotonic()
    response = await http.post("/v1/chat/completions", json=chatBody(False),
                               headers={"Authorization": f"Bearer {token}"})
    return response.status_code, (time.monotonic() - started) * 1000, response.headers.get("retry-after", "")


def refusalDurations(logPath: Path) -> dict[str, Any]:
    """durationMs of the 503 queue_full answers in the service's access log: the time inside the service, from the
    request's first byte to the end of its response, without the client's and the machine's queueing."""
    durations = []
    for line in logPath.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"queue_full"' in line and line.startswith("{"):
            record = orjson.loads(line)
            if record.get("status") == 503 and record.get("durationMs") is not None:
                durations.append(record["durationMs"])
    return {"requests": len(durations), "p50Ms": percentile(durations, 50), "p99Ms": percentile(durations, 99),
            "maxMs": max(durations, default=0.0)}


def runAll(setup: Setup) -> dict[str, Any]:
    results: dict[str, Any] = {"slots": SLOTS, "tokens": setup.tokens, "tokenMs": setup.tokenMs,
                               "flood": setup.flood, "generationSeconds": setup.generationSeconds, "fairness": []}
    with tempfile.TemporaryDirectory(prefix="benchAdmission-") as folder:
        rig = Rig(Path(folder), setup)
        try:
            stubUrl = rig.startStub()
            for order, count in (("fair", setup.aRequests), ("fifo", max(2, setup.aRequests // 3))):
                rig.startService(stubUrl, order, setup.flood + 16)
                results["fairness"].append(asyncio.run(fairnessRun(rig, order, count)))
                rig.stopService()
            rig.startService(stubUrl, "fair", OVERLOAD_QUEUE, logLevel="info")
            results["overload"] = asyncio.run(overloadRun(rig, stubUrl))
            rig.stopService()
            results["overload"]["serviceSide"] = refusalDurations(rig.logPath)
        finally:
            rig.stop()
    return results


def reportMarkdown(results: dict[str, Any]) -> str:
    generationMs = results["generationSeconds"] * 1000
    lines = [f"Stub: {results['slots']} slots, {results['tokens']} tokens per answer at {results['tokenMs']:g} ms "
             f"per token (~{1000 / results['tokenMs']:.0f} tokens/s, {generationMs:.0f} ms per answer); key B keeps "
             f"{results['flood']} streams in flight, key A sends one stream at a time. Machine load average "
             f"{results.get('loadAverage', ['?'])[0]} before, {results.get('loadAverage', ['?', '?'])[-1]} after "
             "(2 cores, shared).", "",
             "| Queue order | A idle TTFT p50 | A TTFT p50 | A TTFT p95 | A max | goal p95 ≤ 1.5×(idle + one answer) "
             "| slot utilisation while queued | B answers in window |", "|---|---|---|---|---|---|---|---|"]
    for run in results["fairness"]:
        goal = 1.5 * (run["idleTtftP50Ms"] + generationMs)
        verdict = "met" if run["ttftP95Ms"] <= goal else "missed"
        lines.append(f"| {run['order']} ({run['aRequests']} A requests) | {run['idleTtftP50Ms']:.0f} ms | "
                     f"{run['ttftP50Ms']:.0f} ms | {run['ttftP95Ms']:.0f} ms | {run['ttftMaxMs']:.0f} ms | "
                     f"{goal:.0f} ms: {verdict} | {run['utilisation']:.1%} | {run['bCompleted']} |")
    for mode, label in (("sequential", "one at a time"), ("burst", "all at once")):
        run = (results.get("overload") or {}).get(mode)
        if not run:
            continue
        verdict = "met" if run["refused503"] == run["requests"] and run["maxMs"] <= OVERLOAD_GOAL_MS else "missed"
        lines += ["", f"Overload, {label} ({results['slots']} slots busy, {OVERLOAD_QUEUE} queued, "
                  f"{run['requests']} more requests): {run['refused503']} got 503; latency p50 {run['p50Ms']:.1f} ms, "
                  f"p99 {run['p99Ms']:.1f} ms, max {run['maxMs']:.1f} ms (goal: every one 503 within "
                  f"{OVERLOAD_GOAL_MS:g} ms: {verdict}); Retry-After {', '.join(run['retryAfter']) or '-'} s."]
        floor = (results.get("overload") or {}).get("baseline" + mode.title())
        if floor:
            lines[-1] += (f" For comparison, `GET /v1/models` {label} in the same run: p50 {floor['p50Ms']:.1f} ms, "
                          f"p99 {floor['p99Ms']:.1f} ms, max {floor['maxMs']:.1f} ms.")
    inside = (results.get("overload") or {}).get("serviceSide")
    if inside and inside["requests"]:
        lines += ["", f"Inside the service (access log `durationMs` of the {inside['requests']} `queue_full` answers, "
                  f"both runs): p50 {inside['p50Ms']:.1f} ms, p99 {inside['p99Ms']:.1f} ms, max {inside['maxMs']:.1f} "
                  f"ms (goal {OVERLOAD_GOAL_MS:g} ms: {'met' if inside['maxMs'] <= OVERLOAD_GOAL_MS else 'missed'})."]
    return "\n".join(lines)


def main() -> dict[str, Any]:
    quick = bool(os.environ.get("BENCH_QUICK"))
    setup = Setup(tokens=int(_option("BENCH_ADMISSION_TOKENS", "15")),
                  tokenMs=float(_option("BENCH_ADMISSION_TOKEN_MS", "33")),
                  flood=int(_option("BENCH_ADMISSION_FLOOD", "64")),
                  aRequests=int(_option("BENCH_ADMISSION_A_REQUESTS", "6" if quick else "12")), quick=quick)
    loadBefore = os.getloadavg()[0]
    results = runAll(setup)
    results["loadAverage"] = [round(loadBefore, 1), round(os.getloadavg()[0], 1)]
    results["markdown"] = reportMarkdown(results)
    print(results["markdown"])
    return results


if __name__ == "__main__":
    main()
