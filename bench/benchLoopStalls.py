"""Event-loop stalls from heavy request work (issue 17): how long the loop pauses while one request re-encodes a big
TIFF or carries a large JSON body, with the work on the offload pool (now) and, for comparison, on the loop (before).

The service runs in-process against the Ollama stub; a task sleeping 5 ms records the longest gap between its
wake-ups, and a client asks /health/liveliness every 20 ms meanwhile. ``python -m bench.benchLoopStalls``; part of
``make bench``. BENCH_QUICK=1 uses a smaller image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import orjson
from PIL import Image

import guard.jsonBody
import routeOpenAi
from app import createApp
from config import loadSettings

KEY = "bench-openai-key-0123456789"
INI = f"""
[auth]
api_keys = bench=bench-analysis-key-0123456789
openai_keys = bench={KEY}
[whisper]
enabled = false
[warmup]
models =
"""


def tiffBody(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 120, 200)).save(buffer, "TIFF", compression="tiff_deflate")
    url = "data:image/tiff;base64," + base64.b64encode(buffer.getvalue()).decode()
    return orjson.dumps({"model": "poweron-vision-general", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]})


def messagesBody(count: int) -> bytes:
    return orjson.dumps({"model": "poweron-text-general", "messages": [{"role": "user", "content": "hallo"}] * count})


@contextmanager
def onTheLoop(enabled: bool) -> Iterator[None]:
    """The work as it was before issue 17: image bodies translated and large bodies parsed on the event loop."""
    saved = routeOpenAi.carriesImages, guard.jsonBody.INLINE_PARSE_BYTES
    if enabled:
        routeOpenAi.carriesImages = lambda body: False
        guard.jsonBody.INLINE_PARSE_BYTES = 1 << 40
    try:
        yield
    finally:
        routeOpenAi.carriesImages, guard.jsonBody.INLINE_PARSE_BYTES = saved


async def measure(baseUrl: str, body: bytes) -> dict[str, Any]:
    app = createApp(loadSettings(ollama={"base_url": baseUrl}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://bench", timeout=300) as http:
        gaps: list[float] = []
        probes: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async def probe() -> None:
            while not done.is_set():
                began = time.perf_counter()
                await http.get("/health/liveliness")
                probes.append(time.perf_counter() - began)
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(tick()), asyncio.create_task(probe())]
        await asyncio.sleep(0.1)
        rssBefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        began = time.perf_counter()
        answer = await http.post("/v1/chat/completions", content=body, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        seconds = time.perf_counter() - began
        done.set()
        await asyncio.gather(*tasks)
    return {"status": answer.status_code, "requestSeconds": round(seconds, 2),
            "longestPauseMs": round(max(gaps) * 1000), "probes": len(probes),
            "slowestProbeMs": round(max(probes) * 1000) if probes else None,
            "peakRssGrowthMiB": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rssBefore) / 1024)}


def runAll(quick: bool) -> list[dict[str, Any]]:
    from tests.ollamaStub import StubServer

    size = 3000 if quick else 7000
    cases = ((f"TIFF {size}x{size} (deflate) re-encoded as PNG", tiffBody(size)),
             ("300,000 messages (10 MB JSON, 413 too_many_messages)", messagesBody(300_000)))
    rows = []
    with tempfile.TemporaryDirectory() as directory, StubServer() as stub:
        ini = Path(directory) / "config.ini"
        ini.write_text(INI, encoding="utf-8")
        os.environ["PRIVATE_LLM_CONFIG"] = str(ini)
        for name, body in cases:
            for before in (False, True):
                with onTheLoop(before):
                    result = asyncio.run(measure(stub.baseUrl, body))
                rows.append({"case": name, "work": "on the loop (before)" if before else "offload pool (now)",
                             **result})
    return rows


def reportMarkdown(rows: list[dict[str, Any]]) -> str:
    lines = ["One request with heavy work while a 5 ms ticker and a liveliness prober (every 20 ms) run on the same "
             "loop (in-process, Ollama stub). Peak RSS growth is the process's, so it only shows a new peak.", "",
             "| Case | Work | Status | Request s | Longest loop pause ms | Probes answered | Slowest probe ms | "
             "Peak RSS growth MiB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['work']} | {row['status']} | {row['requestSeconds']} | "
                     f"{row['longestPauseMs']} | {row['probes']} | {row['slowestProbeMs']} | "
                     f"{row['peakRssGrowthMiB']} |")
    return "\n".join(lines)


def main() -> dict[str, Any]:
    rows = runAll(bool(os.environ.get("BENCH_QUICK")))
    markdown = reportMarkdown(rows)
    print(markdown)
    return {"rows": rows, "markdown": markdown}


if __name__ == "__main__":
    main()
