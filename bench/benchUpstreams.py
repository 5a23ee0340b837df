"""Several GPU servers behind one service: throughput with two Ollama stand-ins against one, and time to first
token when the model is loaded on one daemon and cold on the other.

The stand-ins are tests/ollamaStub.py processes with 2 parallel slots each (``--max-parallel 2``, further requests
wait inside the daemon as with OLLAMA_NUM_PARALLEL) and a realistic token rate (``--chunk-delay-ms``: 30 tokens/s
by default, one token per line); a cold load costs ``--slow-load-ms``. The service runs as ``python app.py``.

Run:  python -m bench.benchUpstreams   (prints markdown; ``main()`` returns the results, markdown under "markdown")
Options (environment): BENCH_UP_REQUESTS (32), BENCH_UP_CONCURRENCY (8), BENCH_UP_TOKENS (32), BENCH_UP_TOKEN_MS
(33), BENCH_UP_COLD_LOAD_MS (3000), BENCH_UP_TTFT_REQUESTS (12).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.procs import BenchProcess, freePort

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL, EXTERNAL = "qwen2.5:7b", "poweron-text-general"
NUM_CTX = 4096
START_TIMEOUT_SECONDS = 60
COLD_TTFT_FACTOR = 0.5
"""A first token later than this share of the cold-load time counts as a cold load."""


def _option(name: str, default: str) -> float:
    return float(os.environ.get(name, default))


def startStub(workDir: Path, name: str, tokens: int, tokenMs: float, coldLoadMs: float) -> tuple[BenchProcess, str]:
    port = freePort()
    command = [sys.executable, "-m", "tests.ollamaStub", "--port", str(port), "--models", MODEL, "--no-record",
               "--chunks", str(tokens), "--chunk-delay-ms", str(tokenMs), "--max-parallel", "2",
               "--slow-load-ms", str(coldLoadMs)]
    stub = BenchProcess(name, command, dict(os.environ), 1, workDir / f"{name}.log", REPO_ROOT).start()
    url = f"http://127.0.0.1:{port}"
    stub.waitForHttp(url + "/api/version", START_TIMEOUT_SECONDS)
    return stub, url


def serviceIni(port: int, key: str, upstreams: dict[str, str], warm: bool) -> str:
    pairs = ", ".join(f"{name}={url}" for name, url in upstreams.items())
    return f"""
[server]
port = {port}
log_level = warning
[auth]
api_keys = bench={secrets.token_urlsafe(32)}
openai_keys = load={key}
[ratelimit]
openai_requests_per_minute = 1000000
openai_burst = 100000
max_concurrent_per_key = 1000
[ollama]
upstreams = {pairs}
num_parallel = 2
num_ctx = {NUM_CTX}
discovery_ttl = 1
[whisper]
enabled = false
[warmup]
models = {EXTERNAL if warm else ""}
[metrics]
enabled = false
"""


def startService(workDir: Path, label: str, upstreams: dict[str, str], warm: bool) -> tuple[BenchProcess, str, str]:
    port, key = freePort(), secrets.token_urlsafe(32)
    ini = workDir / f"{label}.ini"
    ini.write_text(serviceIni(port, key, upstreams, warm), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVATE_LLM_")}
    env["PRIVATE_LLM_CONFIG"] = str(ini)
    service = BenchProcess(label, [sys.executable, "app.py"], env, 0, workDir / f"{label}.log", REPO_ROOT).start()
    base = f"http://127.0.0.1:{port}"
    service.waitForHttp(base + "/health/liveliness", START_TIMEOUT_SECONDS)
    return service, base, key


def waitUntil(condition: Any, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def loadedAt(url: str) -> bool:
    models = httpx.get(url + "/api/ps", trust_env=False).json().get("models") or []
    return any(entry.get("name", "").startswith(MODEL) for entry in models)


async def oneStream(client: httpx.AsyncClient, base: str, key: str) -> tuple[float, int]:
    """(seconds to the first content delta, content deltas) of one streamed chat completion."""
    body = {"model": EXTERNAL, "stream": True, "messages": [{"role": "user", "content": "Tell me a story"}]}
    started, ttft, deltas = time.perf_counter(), None, 0
    async with client.stream("POST", base + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if '"content"' in line:
                deltas += 1
                ttft = ttft if ttft is not None else time.perf_counter() - started
    return (ttft if ttft is not None else float("nan")), deltas


async def runLoad(base: str, key: str, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` streamed chats through ``concurrency`` clients; wall time, requests/s, tokens/s, TTFTs."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(requests):
        queue.put_nowait(number)
    results: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                results.append(await oneStream(client, base, key))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    ttfts = sorted(ttft for ttft, _ in results)
    return {"requests": len(results), "seconds": seconds, "requestsPerSecond": len(results) / seconds,
            "tokensPerSecond": sum(deltas for _, deltas in results) / seconds,
            "ttftP50": statistics.median(ttfts), "ttftMax": ttfts[-1], "ttfts": ttfts}


def throughput(workDir: Path, stubs: dict[str, str], requests: int, concurrency: int) -> dict[str, Any]:
    """The service with these upstreams, the model warmed on each, under the load."""
    service, base, key = startService(workDir, f"service-{len(stubs)}", stubs, warm=True)
    try:
        waitUntil(lambda: all(loadedAt(url) for url in stubs.values()), "the warm-up on every upstream")
        time.sleep(1.5)  # discovery has seen the residency
        return asyncio.run(runLoad(base, key, requests, concurrency))
    finally:
        service.stop()


def coldVsWarm(workDir: Path, stubs: dict[str, str], requests: int, coldLoadMs: float) -> dict[str, Any]:
    """Model loaded at the first daemon only: TTFT one at a time and two at once (the free slots of the warm one)."""
    warmUrl, coldUrl = stubs["warm"], stubs["cold"]
    httpx.post(warmUrl + "/api/chat", json={"model": MODEL, "messages": [], "keep_alive": -1,
                                            "options": {"num_ctx": NUM_CTX}}, timeout=60, trust_env=False)
    service, base, key = startService(workDir, "service-ttft", stubs, warm=False)
    try:
        time.sleep(2.0)  # discovery has seen the residency
        sequential = asyncio.run(runLoad(base, key, requests, 1))
        paired = asyncio.run(runLoad(base, key, requests, 2))
        coldAfter = loadedAt(coldUrl)
    finally:
        service.stop()
    direct = asyncio.run(directColdTtft(coldUrl))
    ttfts = sequential["ttfts"] + paired["ttfts"]
    return {"sequential": sequential, "paired": paired, "coldLoads": sum(t > coldLoadMs / 1000 * COLD_TTFT_FACTOR
                                                                         for t in ttfts),
            "coldDaemonLoaded": coldAfter, "directColdTtft": direct}


async def directColdTtft(url: str) -> float:
    """For scale: the first token of a request sent straight to the cold daemon (what a wrong pick costs)."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_ctx": NUM_CTX}}
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        async with client.stream("POST", url + "/api/chat", json=body) as response:
            async for _line in response.aiter_lines():
                return time.perf_counter() - started
    return float("nan")


def markdown(results: dict[str, Any]) -> str:
    one, two, ttft = results["one"], results["two"], results["ttft"]
    cfg = results["config"]
    lines = [f"Two Ollama stand-ins (tests/ollamaStub.py, 2 slots each, {cfg['tokens']} tokens per answer at "
             f"{1000 / cfg['tokenMs']:.0f} tokens/s, cold load {cfg['coldLoadMs'] / 1000:g} s) behind one service; "
             f"{cfg['requests']} streamed chats through {cfg['concurrency']} clients.", "",
             "| Upstreams | wall time | requests/s | tokens/s | TTFT p50 | TTFT max |", "|---|---|---|---|---|---|"]
    for label, run in (("one", one), ("two", two)):
        lines.append(f"| {label} | {run['seconds']:.2f} s | {run['requestsPerSecond']:.2f} | "
                     f"{run['tokensPerSecond']:.0f} | {run['ttftP50'] * 1000:.0f} ms | "
                     f"{run['ttftMax'] * 1000:.0f} ms |")
    lines += ["", f"**Throughput two ÷ one: {results['ratio']:.2f}x** (goal >= 1.9x).", "",
              "Model loaded on one daemon, cold on the other (no warm-up):", "",
              "| Load | requests | TTFT p50 | TTFT max |", "|---|---|---|---|"]
    for label, key in (("one at a time", "sequential"), ("two at once", "paired")):
        run = ttft[key]
        lines.append(f"| {label} | {run['requests']} | {run['ttftP50'] * 1000:.0f} ms | "
                     f"{run['ttftMax'] * 1000:.0f} ms |")
    lines += ["", f"**Cold loads: {ttft['coldLoads']}** (first token later than half the cold-load time); the cold "
              f"daemon {'loaded the model' if ttft['coldDaemonLoaded'] else 'never loaded the model'}. For scale, a "
              f"request sent straight to the cold daemon waited {ttft['directColdTtft'] * 1000:.0f} ms for its first "
              "token."]
    return "\n".join(lines)


def main() -> dict[str, Any]:
    cfg = {"requests": int(_option("BENCH_UP_REQUESTS", "32")),
           "concurrency": int(_option("BENCH_UP_CONCURRENCY", "8")),
           "tokens": int(_option("BENCH_UP_TOKENS", "32")), "tokenMs": _option("BENCH_UP_TOKEN_MS", "33"),
           "coldLoadMs": _option("BENCH_UP_COLD_LOAD_MS", "3000"),
           "ttftRequests": int(_option("BENCH_UP_TTFT_REQUESTS", "12"))}
    stubs: list[BenchProcess] = []
    with tempfile.TemporaryDirectory(prefix="benchUpstreams-") as folder:
        workDir = Path(folder)
        try:
            urls = {}
            for name in ("gpu1", "gpu2", "warm", "cold"):
                process, urls[name] = startStub(workDir, name, cfg["tokens"], cfg["tokenMs"], cfg["coldLoadMs"])
                stubs.append(process)
            one = throughput(workDir, {"gpu1": urls["gpu1"]}, cfg["requests"], cfg["concurrency"])
            two = throughput(workDir, {"gpu1": urls["gpu1"], "gpu2": urls["gpu2"]}, cfg["requests"],
                             cfg["concurrency"])
            ttft = coldVsWarm(workDir, {"warm": urls["warm"], "cold": urls["cold"]}, cfg["ttftRequests"],
                              cfg["coldLoadMs"])
        finally:
            for process in stubs:
                process.stop()
    results: dict[str, Any] = {"config": cfg, "one": one, "two": two, "ttft": ttft,
                               "ratio": two["requestsPerSecond"] / one["requestsPerSecond"]}
    results["markdown"] = markdown(results)
    return results


if __name__ == "__main__":
    print(main()["markdown"])
