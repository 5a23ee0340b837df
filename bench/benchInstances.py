"""Several workers and shared state (issue 19): non-streaming `/v1/chat/completions` through the service in front of
the instant upstream (bench/instantUpstream.py), in three set-ups: 1 worker with its limits in the process, 1 worker
with its limits in Redis (a real redis-server on 127.0.0.1), 2 workers on one port with their limits in Redis.

- Throughput: wrk at concurrency 64, requests per second per set-up (1 vs 2 workers).
- Cost of the Redis round trips: wrk at concurrency 1, p50 with Redis minus p50 in the process (one admit script
  per request, plus the lease's release after the answer).

On this 2-core machine nothing is pinned: the workers, the upstream stand-in, redis-server and wrk (the load
generator) share both cores, so 2 workers cannot show a clean 2x; the numbers say what the second core buys here.

Run:  python -m bench.benchInstances   (prints markdown; ``main()`` returns a dict with it under "markdown")
Environment: BENCH_QUICK=1 (2 s runs), BENCH_INSTANCES_SECONDS (5), BENCH_INSTANCES_ROUNDS (2).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.procs import BenchProcess, freePort
from bench.run import CHUNKS, OLLAMA_MODEL, openAiBody, serviceIni
from bench.wrkRunner import WrkError, runWrk

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 120
ALL_CORES = "0,1"
SETUPS = (("process", "1 worker, limits in the process", 1, False),
          ("redis", "1 worker, limits in Redis", 1, True),
          ("redis2", "2 workers, limits in Redis", 2, True))
THROUGHPUT_CONCURRENCY = 64


class RedisProcess:
    def __init__(self, directory: Path) -> None:
        self.port = freePort()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = BenchProcess("redis", [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1",
                                              "--port", str(self.port), "--save", "", "--appendonly", "no"],
                                    dict(os.environ), ALL_CORES, directory / "redis.log", directory)

    def start(self) -> RedisProcess:
        self.process.start()
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            if time.monotonic() > deadline or not self.process.alive():
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        return self


async def _scriptRoundTrips(redisUrl: str, count: int) -> dict[str, float]:
    """The admit script alone, as the service calls it (state/redisStore.py), sequentially: p50/p90 in ms."""
    from state.redisStore import RedisStore

    store = RedisStore(redisUrl, 30, 1.0)
    await store.start()
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            result = await store.admit("openai:bench-rtt", 1_000_000, 1_000_000.0, 1_000_000)
            times.append((time.perf_counter() - started) * 1000)
            store.release(result.leaseKey, result.leaseId)
            await asyncio.sleep(0)
    finally:
        await store.close()
    times.sort()
    return {"p50Ms": times[len(times) // 2], "p90Ms": times[int(len(times) * 0.9)]}


def startService(directory: Path, name: str, upstreamUrl: str, workers: int,
                 redisUrl: str | None) -> tuple[BenchProcess, str, str]:
    port, openAiKey = freePort(), secrets.token_urlsafe(32)
    iniPath = directory / f"{name}.ini"
    iniPath.write_text(serviceIni(port, upstreamUrl, secrets.token_urlsafe(32), openAiKey), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PRIVATE_LLM_")}
    env.update(PRIVATE_LLM_CONFIG=str(iniPath), PRIVATE_LLM_SERVER__WORKERS=str(workers))
    if redisUrl:
        env["PRIVATE_LLM_STATE__REDIS_URL"] = redisUrl
    service = BenchProcess(name, [sys.executable, "app.py"], env, ALL_CORES, directory / f"{name}.log",
                           REPO_ROOT).start()
    baseUrl = f"http://127.0.0.1:{port}"
    service.waitForHttp(baseUrl + "/health/readiness", START_TIMEOUT_SECONDS)
    return service, baseUrl, openAiKey


def measureSetup(directory: Path, setup: tuple, upstreamUrl: str, redisUrl: str, seconds: float) -> dict[str, Any]:
    name, _, workers, withRedis = setup
    service, baseUrl, key = startService(directory, name, upstreamUrl, workers, redisUrl if withRedis else None)
    bodyFile = directory / "body.json"
    try:
        url = baseUrl + "/v1/chat/completions"
        runWrk(url, bodyFile, key, 4, 1, None)  # warm-up: connections, first model lookups
        single = runWrk(url, bodyFile, key, 1, seconds, None)
        loaded = runWrk(url, bodyFile, key, THROUGHPUT_CONCURRENCY, seconds, None)
    finally:
        service.stop()
    return {"p50c1Ms": single.p50Ms, "p90c1Ms": single.p90Ms, "rpsC1": single.rps, "rpsC64": loaded.rps,
            "p50c64Ms": loaded.p50Ms, "errors": single.errors + loaded.errors}


def runAll(seconds: float, rounds: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="bench-instances-"))
    (directory / "body.json").write_bytes(openAiBody(False))
    upstreamPort = freePort()
    upstream = BenchProcess("upstream", [sys.executable, "-m", "bench.instantUpstream", "--port", str(upstreamPort),
                                         "--models", OLLAMA_MODEL, "--chunks", str(CHUNKS)],
                            dict(os.environ), ALL_CORES, directory / "upstream.log", REPO_ROOT).start()
    redis = RedisProcess(directory)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in SETUPS}
    try:
        upstream.waitForHttp(f"http://127.0.0.1:{upstreamPort}/api/version", START_TIMEOUT_SECONDS)
        redis.start()
        scriptRtt = asyncio.run(_scriptRoundTrips(redis.url, 2000))
        for roundIndex in range(rounds):
            order = SETUPS if roundIndex % 2 == 0 else tuple(reversed(SETUPS))
            for setup in order:
                runs[setup[0]].append(measureSetup(directory, setup, f"http://127.0.0.1:{upstreamPort}",
                                                   redis.url, seconds))
    finally:
        redis.process.stop()
        upstream.stop()
    return {"seconds": seconds, "rounds": rounds, "runs": runs, "summary": summarise(runs), "scriptRtt": scriptRtt}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    mean = {name: {key: _mean([run[key] for run in items]) for key in items[0]} for name, items in runs.items()
            if items}
    process, redis, two = mean.get("process", {}), mean.get("redis", {}), mean.get("redis2", {})
    return {"mean": mean,
            "redisAddedP50Ms": redis.get("p50c1Ms", 0.0) - process.get("p50c1Ms", 0.0),
            "twoWorkersSpeedup": two.get("rpsC64", 0.0) / redis["rpsC64"] if redis.get("rpsC64") else None}


def reportMarkdown(results: dict[str, Any]) -> str:
    summary, mean = results["summary"], results["summary"]["mean"]
    lines = [f"Non-streaming chat, wrk {results['seconds']:g} s per run, {results['rounds']} rounds (order "
             "alternated), means. Nothing pinned: workers, upstream stand-in, redis-server and wrk share the 2 "
             "cores.", "",
             "| Set-up | c=1 p50 ms | c=1 p90 ms | c=1 req/s | c=64 req/s | c=64 p50 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for name, label, *_ in SETUPS:
        row = mean.get(name)
        if row:
            lines.append(f"| {label} | {row['p50c1Ms']:.2f} | {row['p90c1Ms']:.2f} | {row['rpsC1']:.0f} | "
                         f"{row['rpsC64']:.0f} | {row['p50c64Ms']:.1f} | {row['errors']:.0f} |")
    speedup = summary["twoWorkersSpeedup"]
    lines += ["", f"- Redis round trips add **{summary['redisAddedP50Ms']:.2f} ms** to the p50 at concurrency 1 "
              "(one admit script before the request, the lease's release after it).",
              f"- The admit script alone (2000 sequential calls from one asyncio client, as the service makes them): "
              f"p50 {results['scriptRtt']['p50Ms']:.2f} ms, p90 {results['scriptRtt']['p90Ms']:.2f} ms.",
              f"- Load average of the machine (1 min) before and after: {results.get('loadAverage', '?')}.",
              f"- 2 workers against 1 (both with Redis) at concurrency 64: **{speedup:.2f}x** the requests per second"
              if speedup else "- 2 workers: not measured", ""]
    return "\n".join(lines)


def main() -> dict[str, Any]:
    if shutil.which("redis-server") is None or shutil.which("wrk") is None:
        return {"error": "redis-server or wrk is not installed (make test-deps)"}
    quick = bool(os.environ.get("BENCH_QUICK"))
    seconds = float(os.environ.get("BENCH_INSTANCES_SECONDS") or (2 if quick else 5))
    rounds = int(os.environ.get("BENCH_INSTANCES_ROUNDS") or (1 if quick else 2))
    loadBefore = os.getloadavg()[0]
    try:
        results = runAll(seconds, rounds)
    except (WrkError, RuntimeError, TimeoutError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    results["loadAverage"] = [round(loadBefore, 1), round(os.getloadavg()[0], 1)]
    results["markdown"] = reportMarkdown(results)
    print(results["markdown"])
    print(orjson.dumps(results["summary"]).decode())
    return results


if __name__ == "__main__":
    main()
