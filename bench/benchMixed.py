"""Mixed traffic against a stub that behaves like the real daemon: model reloads must be 0.

The Ollama stub runs in its realistic mode (tests/stubScheduler.py: a loaded runner keeps its runner options and a
request with other options reloads it after ``LOAD_DELAY_MS``, waiting for the requests in flight; one slot per
model as with OLLAMA_NUM_PARALLEL=1). The service starts with a warm-up of three models, then clients send, at
once and for ``BENCH_MIXED_SECONDS`` (default 20): /v1 chat (streamed and not), /api/text, /api/analyze (a PNG,
qwen2.5vl), /v1 chat with an image, /api/embed and /v1/embeddings. Before issue 15 the warm-up loaded with no
options, /v1 sent num_ctx 8192 and /api/analyze/text multiples of 8192 sized to the input, so the same traffic
reloaded qwen2.5vl and qwen2.5 back and forth. Reported: loads, reloads (must be 0), requests and statuses per
route, p50/max latency.

Run alone:  python -m bench.benchMixed   (also part of ``make bench``, section "Mixed traffic")
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.procs import BenchProcess, freePort

REPO_ROOT = Path(__file__).resolve().parent.parent
LOAD_DELAY_MS = 1500
START_TIMEOUT_SECONDS = 60.0
STUB_MODELS = "qwen2.5:7b,qwen2.5vl:7b,nomic-embed-text:latest"
WARMUP = "poweron-text-general, poweron-vision-general, poweron-embed"
CLIENTS_PER_ROUTE = 2


def serviceIni(port: int, stubUrl: str, apiKey: str, openAiKey: str) -> str:
    return (f"[server]\nhost = 127.0.0.1\nport = {port}\nlog_level = warning\ngraceful_shutdown_seconds = 2\n\n"
            f"[ollama]\nbase_url = {stubUrl}\nnum_parallel = 1000\nmax_queue = 1000\n\n"
            f"[auth]\napi_keys = gateway={apiKey}\nopenai_keys = bench={openAiKey}\n\n"
            f"[ratelimit]\nper_key = gateway=10000000/100000/100000, bench=10000000/100000/100000\n\n"
            f"[documents]\nprestart_workers = true\n\n[whisper]\nenabled = false\n\n[warmup]\nmodels = {WARMUP}\n")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (235, 235, 235)).save(buffer, format="PNG")
    return buffer.getvalue()


def routeCalls(apiKey: str, openAiKey: str) -> dict[str, Any]:
    """name -> (path, request kwargs) of the mixed traffic."""
    api, v1 = {"X-API-Key": apiKey}, {"Authorization": f"Bearer {openAiKey}"}
    image = "data:image/png;base64," + base64.b64encode(_png(800, 600)).decode()
    text = "Please summarise the following notes in two sentences. " * 20
    chat = {"model": "poweron-text-general", "messages": [{"role": "user", "content": text}]}
    vision = {"model": "poweron-vision-general", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is on the receipt?"}, {"type": "image_url", "image_url": {"url": image}}]}]}
    return {
        "v1 chat": ("/v1/chat/completions", {"json": chat, "headers": v1}),
        "v1 chat stream": ("/v1/chat/completions", {"json": {**chat, "stream": True}, "headers": v1}),
        "v1 chat image": ("/v1/chat/completions", {"json": vision, "headers": v1}),
        "api text": ("/api/text", {"json": {"prompt": "Neutralise names", "text": text}, "headers": api}),
        "api analyze": ("/api/analyze", {"files": {"file": ("r.png", _png(1200, 900), "image/png")},
                                         "data": {"prompt": "Total?"}, "headers": api}),
        "api embed": ("/api/embed", {"json": {"texts": [text[:400], text[:200]]}, "headers": api}),
        "v1 embeddings": ("/v1/embeddings", {"json": {"model": "poweron-embed", "input": [text[:300]]},
                                             "headers": v1}),
    }


async def _client(http: httpx.AsyncClient, name: str, call: Any, until: float, results: dict[str, list]) -> None:
    path, kwargs = call
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            response = await http.post(path, **kwargs)
            status = response.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        results[name].append((status, time.perf_counter() - started))


async def drive(baseUrl: str, calls: dict[str, Any], seconds: float) -> dict[str, list]:
    results: dict[str, list] = {name: [] for name in calls}
    until = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=baseUrl, timeout=120.0, trust_env=False) as http:
        await asyncio.gather(*(_client(http, name, call, until, results)
                               for name, call in calls.items() for _ in range(CLIENTS_PER_ROUTE)))
    return results


def _waitForWarmup(stubUrl: str) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        scheduler = httpx.get(stubUrl + "/_stub/scheduler", trust_env=False).json()
        if scheduler["loads"] >= 3 and scheduler["pending"] == 0:
            return scheduler
        time.sleep(0.2)
    raise RuntimeError("the warm-up did not load the three models")


def summarise(results: dict[str, list], before: dict[str, Any], after: dict[str, Any],
              ps: list[dict[str, Any]]) -> dict[str, Any]:
    routes = []
    for name, samples in results.items():
        seconds = [elapsed for _, elapsed in samples] or [0.0]
        statuses: dict[str, int] = {}
        for status, _ in samples:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        routes.append({"route": name, "requests": len(samples),
                       "statuses": ", ".join(f"{key}: {value}" for key, value in sorted(statuses.items())),
                       "p50Ms": round(statistics.median(seconds) * 1000, 1), "maxMs": round(max(seconds) * 1000, 1)})
    return {"loadsAtWarmup": before["loads"], "loadsAfterTraffic": after["loads"],
            "modelReloads": after["reloads"] - before["reloads"], "reloadsRequired": 0,
            "contextLengths": ", ".join(f"{entry['name']} {entry['context_length']}" for entry in ps),
            "loadDelayMs": LOAD_DELAY_MS, "routes": routes}


def runMixed(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="benchMixed-") as folder:
        workDir, stubPort, port = Path(folder), freePort(), freePort()
        apiKey, openAiKey = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        stub = BenchProcess("stub", [sys.executable, "-m", "tests.ollamaStub", "--port", str(stubPort), "--models",
                                     STUB_MODELS, "--no-record", "--load-delay-ms", str(LOAD_DELAY_MS)],
                            dict(os.environ), 0, workDir / "stub.log", REPO_ROOT).start()
        service = None
        try:
            stubUrl = f"http://127.0.0.1:{stubPort}"
            stub.waitForHttp(stubUrl + "/api/version", START_TIMEOUT_SECONDS)
            iniPath = workDir / "service.ini"
            iniPath.write_text(serviceIni(port, stubUrl, apiKey, openAiKey), encoding="utf-8")
            env = {key: value for key, value in os.environ.items() if not key.startswith("PRIVATE_LLM_")}
            env["PRIVATE_LLM_CONFIG"] = str(iniPath)
            service = BenchProcess("service", [sys.executable, "app.py"], env, 0, workDir / "service.log",
                                   REPO_ROOT).start()
            service.waitForHttp(f"http://127.0.0.1:{port}/health/liveliness", START_TIMEOUT_SECONDS)
            before = _waitForWarmup(stubUrl)
            results = asyncio.run(drive(f"http://127.0.0.1:{port}", routeCalls(apiKey, openAiKey), seconds))
            after = httpx.get(stubUrl + "/_stub/scheduler", trust_env=False).json()
            ps = httpx.get(stubUrl + "/api/ps", trust_env=False).json()["models"]
            return summarise(results, before, after, ps)
        finally:
            if service is not None:
                service.stop()
            stub.stop()


def main() -> dict[str, Any]:
    seconds = float(os.environ.get("BENCH_MIXED_SECONDS", "5" if os.environ.get("BENCH_QUICK") else "20"))
    result = runMixed(seconds)
    print(f"mixed traffic for {seconds:.0f} s: {result['modelReloads']} model reloads "
          f"(loads at warm-up {result['loadsAtWarmup']}, after {result['loadsAfterTraffic']}); "
          f"windows: {result['contextLengths']}", flush=True)
    for route in result["routes"]:
        print(f"  {route['route']:16} {route['requests']:5} requests  {route['statuses']:20} "
              f"p50 {route['p50Ms']:8.1f} ms  max {route['maxMs']:8.1f} ms", flush=True)
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["modelReloads"] == 0 else 1)
