"""The service's upstream client against aiohttp's ClientSession (llhttp) and httpx's own pool: CPU per request,
latency tails and correctness, side by side.

``python -m bench.transportAb [--seconds 3] [--rounds 2]``. The instant upstream runs on the load core; each client
runs in its own process on the server core and makes the calls the service makes (non-streaming ``/api/chat``
parsed as JSON, streaming ``/api/chat`` split into NDJSON lines and parsed) from 1 and 64 concurrent tasks on uvloop.
Kinds alternate within each round (A/B/C, then C/B/A). Correctness runs in this process against small raw-asyncio
servers: a chunked body in 33 separate writes, keep-alive reuse, a pooled connection the server closed while it was
idle (stale: the call must succeed), a connection cut while the server works (the POST must not be replayed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from bench.procs import BenchProcess, freePort
from upstream.ollamaClient import OllamaClient, createHttpClient, parseStreamLine, splitLines
from upstream.transport import UpstreamResponseStream, UpstreamTransport

KINDS = ("ours", "aiohttp", "viaHttpx", "httpx")
LABELS = {"ours": "OllamaClient on upstream/transport.py directly (the service)", "aiohttp": "aiohttp 3 ClientSession",
          "viaHttpx": "OllamaClient, httpx client + upstream/transport.py mounted (before)",
          "httpx": "OllamaClient, httpx client + httpcore pool"}
MODEL = "qwen2.5:7b"
PAYLOAD = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
CONCURRENCIES = (1, 64)
SHAPES = ("whole", "stream")
REPO_ROOT = Path(__file__).resolve().parent.parent


class OursClient:
    """What the service runs: OllamaClient on httpx with the lean transport mounted (or httpx's pool)."""

    def __init__(self, baseUrl: str, fast: bool, lean: bool = True) -> None:
        self.http = createHttpClient(3.0, 600.0, 256, baseUrl if fast else None)
        self.ollama = OllamaClient(self.http, baseUrl)
        if not lean:
            self.ollama.lean = None  # through httpx.AsyncClient to the mounted transport, as before

    async def call(self, stream: bool) -> int:
        if not stream:
            answer = await self.ollama.chat(dict(PAYLOAD), MODEL)
            return len(answer["message"]["content"])
        opened = await self.ollama.openStream("/api/chat", dict(PAYLOAD), MODEL)
        try:
            return sum([1 async for _ in opened.chunks()])
        finally:
            await opened.aclose()

    async def close(self) -> None:
        await self.http.aclose()


class AiohttpClient:
    """The same calls on aiohttp's ClientSession (llhttp parser, its own pool), read the same way."""

    def __init__(self, baseUrl: str) -> None:
        import aiohttp

        self.url = baseUrl + "/api/chat"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60), cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(sock_connect=3.0, sock_read=600.0))

    async def call(self, stream: bool) -> int:
        body = orjson.dumps({**PAYLOAD, "stream": stream})
        async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as response:
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
            if not stream:
                return len(orjson.loads(await response.read())["message"]["content"])
            lines, pending = 0, b""
            async for data in response.content.iter_any():
                complete, pending = splitLines(pending + data)
                for line in complete:
                    parseStreamLine(line)
                    lines += 1
            return lines

    async def close(self) -> None:
        await self.session.close()


class RawClient:
    """The transport's own cost: prebuilt request bytes, body chunks straight from the pooled connection."""

    def __init__(self, baseUrl: str) -> None:
        url = httpx.URL(baseUrl)
        self.key = (url.host, url.port or 80)
        self.transport = UpstreamTransport(256, httpx.AsyncHTTPTransport())
        self.head = f"POST /api/chat HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
        self.timeouts = {"connect": 3.0, "read": 600.0, "pool": 8.0}

    async def call(self, stream: bool) -> int:
        body = orjson.dumps({**PAYLOAD, "stream": stream})
        data = (self.head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        connection = await self.transport._exchange(self.key, data, self.timeouts)
        response = UpstreamResponseStream(self.transport, connection, self.key, 600.0)
        try:
            if not stream:
                return len(orjson.loads(b"".join([chunk async for chunk in response]))["message"]["content"])
            lines, pending = 0, b""
            async for data in response:
                complete, pending = splitLines(pending + data)
                for line in complete:
                    parseStreamLine(line)
                    lines += 1
            return lines
        finally:
            await response.aclose()

    async def close(self) -> None:
        await self.transport.aclose()


def makeClient(kind: str, baseUrl: str) -> Any:
    if kind == "raw":
        return RawClient(baseUrl)
    if kind == "aiohttp":
        return AiohttpClient(baseUrl)
    return OursClient(baseUrl, fast=kind != "httpx", lean=kind == "ours")


def percentile(sortedValues: list[float], share: float) -> float:
    return sortedValues[min(len(sortedValues) - 1, int(share * len(sortedValues)))] if sortedValues else 0.0


async def measure(client: Any, stream: bool, concurrency: int, seconds: float) -> dict[str, Any]:
    """Calls from ``concurrency`` tasks for ``seconds``: req/s, CPU of this process per call, latency tails."""
    latencies: list[float] = []
    stopAt = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stopAt:
            started = time.perf_counter()
            await client.call(stream)
            latencies.append(time.perf_counter() - started)

    cpuBefore, wallBefore = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpuBefore, time.perf_counter() - wallBefore
    values = sorted(latencies)
    return {"requests": len(values), "rps": len(values) / wall, "cpuMsPerRequest": cpu * 1000 / len(values),
            **{name: percentile(values, share) * 1000 for name, share in
               (("p50Ms", 0.5), ("p99Ms", 0.99), ("p999Ms", 0.999))}, "maxMs": values[-1] * 1000}


async def workerMain(kind: str, baseUrl: str, seconds: float) -> dict[str, Any]:
    client = makeClient(kind, baseUrl)
    results: dict[str, Any] = {}
    try:
        for shape in SHAPES:
            await measure(client, shape == "stream", max(CONCURRENCIES), 0.5)  # warm-up: pool, imports
            for concurrency in CONCURRENCIES:
                results[f"{shape}/{concurrency}"] = await measure(client, shape == "stream", concurrency, seconds)
    finally:
        await client.close()
    return results


# ------------------------------------------------------------------------------------------------- correctness

WHOLE_BODY = orjson.dumps({"model": MODEL, "message": {"role": "assistant", "content": "hi"}, "done": True})
STREAM_LINES = [orjson.dumps({"model": MODEL, "message": {"content": f"w{i} "}, "done": False}) + b"\n"
                for i in range(32)] + [orjson.dumps({"model": MODEL, "message": {"content": ""}, "done": True}) + b"\n"]


async def readRequest(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


def wholeAnswer() -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(WHOLE_BODY)).encode()
            + b"\r\n\r\n" + WHOLE_BODY)


class Scenario:
    """A raw asyncio server for one correctness case; counts connections and requests."""

    def __init__(self, secondRequest: str = "answer", chunked: bool = False) -> None:
        self.secondRequest, self.chunked = secondRequest, chunked
        self.connections = self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                await readRequest(reader)
                self.requests += 1
                served += 1
                if served == 2 and self.secondRequest != "answer":
                    await asyncio.sleep(0.8 if self.secondRequest == "cutWhileWorking" else 0.0)
                    writer.close()
                    return
                await (self.writeChunked(writer) if self.chunked else self.writeWhole(writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    @staticmethod
    async def writeWhole(writer: asyncio.StreamWriter) -> None:
        writer.write(wholeAnswer())
        await writer.drain()

    @staticmethod
    async def writeChunked(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
        for line in STREAM_LINES:  # one TCP write per chunk, as Ollama flushes each token
            writer.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def runScenario(kind: str, scenario: Scenario, calls: int, stream: bool) -> dict[str, Any]:
    server = await asyncio.start_server(scenario.handle, "127.0.0.1", 0)
    client = makeClient(kind, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    outcomes = []
    try:
        for _ in range(calls):
            try:
                outcomes.append(await asyncio.wait_for(client.call(stream), 5))
            except Exception as exc:  # noqa: BLE001 - the outcome is what is measured
                outcomes.append(type(exc).__name__)
    finally:
        await client.close()
        server.close()
    return {"outcomes": outcomes, "connections": scenario.connections, "requests": scenario.requests}


CASES = {
    "chunked body in 33 writes, 2 streams on 1 connection": (
        lambda: Scenario(chunked=True), 2, True, lambda r: r["outcomes"] == [33, 33] and r["connections"] == 1),
    "keep-alive: 20 calls, 1 connection": (lambda: Scenario(), 20, False,
                                           lambda r: r["connections"] == 1 and r["outcomes"] == [2] * 20),
    "pooled connection closed as the call is sent (stale): call succeeds": (
        lambda: Scenario("closeAtOnce"), 2, False, lambda r: r["outcomes"] == [2, 2]),
    "connection cut while the server works: not replayed": (
        lambda: Scenario("cutWhileWorking"), 2, False,
        lambda r: r["outcomes"][0] == 2 and isinstance(r["outcomes"][1], str) and r["requests"] == 2),
}


async def correctness() -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for case, (makeScenario, calls, stream, passes) in CASES.items():
        for kind in KINDS:
            outcome = await runScenario(kind, makeScenario(), calls, stream)
            outcome["passed"] = passes(outcome)
            results.setdefault(case, {})[kind] = outcome
    return results


# ------------------------------------------------------------------------------------------------- orchestration

def runWorker(kind: str, baseUrl: str, seconds: float, core: int) -> dict[str, Any]:
    command = ["taskset", "-c", str(core), sys.executable, "-m", "bench.transportAb", "--worker", kind, "--url",
               baseUrl, "--seconds", str(seconds)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=seconds * 12 + 60)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} worker failed: {completed.stderr[-600:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def speed(seconds: float, rounds: int, serverCore: int, loadCore: int, workDir: Path) -> dict[str, list[dict]]:
    port = freePort()
    upstream = BenchProcess("upstream", [sys.executable, "-m", "bench.instantUpstream", "--port", str(port),
                                         "--models", MODEL, "--chunks", "32"], dict(os.environ), loadCore,
                            workDir / "upstream.log", REPO_ROOT).start()
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    try:
        upstream.waitForHttp(f"http://127.0.0.1:{port}/api/version", 30)
        for roundIndex in range(rounds):
            for kind in (KINDS if roundIndex % 2 == 0 else KINDS[::-1]):
                runs[kind].append(runWorker(kind, f"http://127.0.0.1:{port}", seconds, serverCore))
                print(f"round {roundIndex + 1} {kind:8} " + "  ".join(
                    f"{cell} {r['rps']:.0f}/s {r['cpuMsPerRequest']:.3f} ms CPU p99 {r['p99Ms']:.1f} max "
                    f"{r['maxMs']:.1f}" for cell, r in runs[kind][-1].items()), flush=True)
    finally:
        upstream.stop()
    return runs


def markdown(runs: dict[str, list[dict]], checks: dict[str, dict[str, Any]], seconds: float) -> str:
    rounds = len(next(iter(runs.values())))
    lines = [f"Each cell: {rounds} rounds of {seconds:g} s, kinds alternating; the client's own "
             "process on the server core (CPU = its CPU time per call), the instant upstream on the other core.", "",
             "| Client | Shape | Concurrency | calls/s | CPU ms per call | p50 ms | p99 ms | p99.9 ms | max ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        for cell in runs[kind][0]:
            shape, concurrency = cell.split("/")
            cells = [run[cell] for run in runs[kind]]
            mean = {key: sum(c[key] for c in cells) / len(cells) for key in ("rps", "cpuMsPerRequest", "p50Ms",
                                                                             "p99Ms", "p999Ms")}
            lines.append(f"| {LABELS[kind]} | {'streaming, 32 lines' if shape == 'stream' else 'whole'} | "
                         f"{concurrency} | {mean['rps']:,.0f} | {mean['cpuMsPerRequest']:.3f} | {mean['p50Ms']:.2f} | "
                         f"{mean['p99Ms']:.2f} | {mean['p999Ms']:.2f} | {max(c['maxMs'] for c in cells):.1f} |")
    lines += ["", "| Correctness case | " + " | ".join(LABELS[k] for k in KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for case, byKind in checks.items():
        verdicts = [("passed" if byKind[k]["passed"] else "**failed**") + f" ({_outcomeText(byKind[k])})"
                    for k in KINDS]
        lines.append(f"| {case} | " + " | ".join(verdicts) + " |")
    return "\n".join(lines) + "\n"


def _outcomeText(outcome: dict[str, Any]) -> str:
    shown = [str(o) for o in outcome["outcomes"][:2]] + (["…"] if len(outcome["outcomes"]) > 2 else [])
    return f"results {', '.join(shown)}; {outcome['connections']} conn., {outcome['requests']} req. seen"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transportAb", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=(*KINDS, "raw"))
    parser.add_argument("--url")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--load-core", type=int, default=1)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(uvloop.run(workerMain(args.worker, args.url, args.seconds))))
        return
    checks = uvloop.run(correctness())
    import tempfile

    with tempfile.TemporaryDirectory(prefix="poweron-transportab-") as workDir:
        os.sched_setaffinity(0, {args.load_core})
        runs = speed(args.seconds, args.rounds, args.server_core, args.load_core, Path(workDir))
    print(markdown(runs, checks, args.seconds))


if __name__ == "__main__":
    main()
