"""An instant Ollama-compatible upstream for the benchmarks: a raw asyncio protocol server (uvloop when installed).

It speaks just enough of Ollama's API for a gateway in front of it: ``/api/chat`` (non-streaming, or NDJSON
streaming with N chunks, instantly or paced), ``/api/generate``, ``/api/tags`` (with capabilities),
``/api/show``, ``/api/version``, ``/api/ps`` and ``/``. Replies are precomputed per model, so the server costs a
few microseconds per request and is never the bottleneck of a benchmark (see docu/performance.md).

Control (not Ollama): ``POST /_bench/config {"chunkDelayMs": 5}`` changes the pacing between streamed chunks.

Run:  python -m bench.instantUpstream --port 11500 --models qwen2.5:7b --chunks 32 [--chunk-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from email.utils import formatdate
from typing import Any

import orjson

DEFAULT_MODELS = ("qwen2.5:7b",)
DEFAULT_CHUNKS = 32
VERSION = "0.12.0"
CREATED_AT = "2026-01-01T00:00:00.000000000Z"
HEADER_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
NEWLINE = orjson.OPT_APPEND_NEWLINE
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 411: b"Length Required"}
JSON_TYPE = b"application/json; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"
TEXT_TYPE = b"text/plain; charset=utf-8"
CONTROL_PATH = "/_bench/config"


class UpstreamState:
    """Models, precomputed reply bodies and the pacing shared by all connections."""

    def __init__(self, models: tuple[str, ...], chunks: int, chunkDelayMs: float) -> None:
        self.models = tuple(normaliseName(name) for name in models)
        self.chunks = chunks
        self.chunkDelay = chunkDelayMs / 1000.0
        self.requestCount = 0
        self.wholeBodies: dict[str, bytes] = {}
        self.streamLines: dict[str, list[bytes]] = {}
        self.tagsBody = orjson.dumps({"models": [tagEntry(name) for name in self.models]})
        for name in self.models:
            self._precompute(name)

    def _precompute(self, name: str) -> None:
        words = [f"word{index} " for index in range(self.chunks)]
        lines = [orjson.dumps(chunkObject(name, word), option=NEWLINE) for word in words]
        lines.append(orjson.dumps(finalObject(name, "", self.chunks), option=NEWLINE))
        self.streamLines[name] = lines
        self.wholeBodies[name] = orjson.dumps(finalObject(name, "".join(words), self.chunks))

    def lookup(self, name: Any) -> str | None:
        if not isinstance(name, str):
            return None
        key = normaliseName(name)
        if key not in self.streamLines and key in self.models:
            self._precompute(key)
        return key if key in self.streamLines else None


def normaliseName(name: str) -> str:
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def tagEntry(name: str) -> dict[str, Any]:
    capabilities = ["embedding"] if "embed" in name else ["completion", "tools"]
    return {"name": name, "model": name, "modified_at": CREATED_AT, "size": 4_683_087_332,
            "digest": "0" * 64, "capabilities": capabilities,
            "details": {"parent_model": "", "format": "gguf", "family": "qwen2", "families": ["qwen2"],
                        "parameter_size": "7.6B", "quantization_level": "Q4_K_M"}}


def chunkObject(name: str, text: str) -> dict[str, Any]:
    return {"model": name, "created_at": CREATED_AT, "message": {"role": "assistant", "content": text},
            "done": False}


def finalObject(name: str, text: str, evalCount: int) -> dict[str, Any]:
    return {**chunkObject(name, text), "done": True, "done_reason": "stop", "total_duration": 1_000_000,
            "load_duration": 1000, "prompt_eval_count": 8, "prompt_eval_duration": 1000,
            "eval_count": evalCount, "eval_duration": 1000}


class DateCache:
    """The HTTP Date header, formatted once per second."""

    def __init__(self) -> None:
        self.second = 0
        self.value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second, self.value = now, formatdate(now, usegmt=True).encode()
        return self.value


DATE = DateCache()


def responseHead(status: int, contentType: bytes, length: int | None, close: bool) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: " + str(length).encode()
    return b"".join((b"HTTP/1.1 ", str(status).encode(), b" ", REASONS.get(status, b"Error"), b"\r\nContent-Type: ",
                     contentType, b"\r\nDate: ", DATE.get(), b"\r\n", framing,
                     b"\r\nConnection: close\r\n\r\n" if close else b"\r\n\r\n"))


def chunked(line: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(line), line)


class ParsedRequest:
    __slots__ = ("method", "path", "body", "close")

    def __init__(self, method: str, path: str, body: bytes, close: bool) -> None:
        self.method, self.path, self.body, self.close = method, path, body, close


def parseHead(head: bytes) -> tuple[str, str, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


def decodeChunkedBody(data: bytearray, start: int) -> tuple[bytes, int] | None:
    """(body, end offset) of a chunked request body starting at ``start``; None while incomplete."""
    parts, position = [], start
    while True:
        lineEnd = data.find(b"\r\n", position)
        if lineEnd < 0:
            return None
        size = int(bytes(data[position:lineEnd]).split(b";")[0], 16)
        if size == 0:
            trailerEnd = data.find(b"\r\n", lineEnd + 2)
            return (b"".join(parts), trailerEnd + 2) if trailerEnd >= 0 else None
        if len(data) < lineEnd + 2 + size + 2:
            return None
        parts.append(bytes(data[lineEnd + 2:lineEnd + 2 + size]))
        position = lineEnd + 2 + size + 2


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order."""

    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.processBuffer()

    def processBuffer(self) -> None:
        while self.transport is not None and self.streaming is None:
            request = self.takeRequest()
            if request is None:
                return
            self.state.requestCount += 1
            self.handle(request)

    def takeRequest(self) -> ParsedRequest | None:
        headEnd = self.buffer.find(HEADER_END)
        if headEnd < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self.fail(400, "request head too large")
            return None
        method, path, headers = parseHead(bytes(self.buffer[:headEnd]))
        bodyStart = headEnd + 4
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            decoded = decodeChunkedBody(self.buffer, bodyStart)
            if decoded is None:
                return None
            body, end = decoded
        else:
            end = bodyStart + int(headers.get(b"content-length", b"0") or 0)
            if len(self.buffer) < end:
                return None
            body = bytes(self.buffer[bodyStart:end])
        del self.buffer[:end]
        return ParsedRequest(method, path, body, headers.get(b"connection", b"").lower() == b"close")

    def fail(self, status: int, message: str) -> None:
        self.reply(status, orjson.dumps({"error": message}), JSON_TYPE, close=True)

    def reply(self, status: int, body: bytes, contentType: bytes = JSON_TYPE, close: bool = False,
              withBody: bool = True) -> None:
        if self.transport is None:
            return
        self.transport.write(responseHead(status, contentType, len(body), close) + (body if withBody else b""))
        if close:
            self.transport.close()

    def handle(self, request: ParsedRequest) -> None:
        route = ROUTES.get(request.path)
        if route is None:
            self.reply(404, b"404 page not found", TEXT_TYPE, request.close)
            return
        methods, handler = route
        if request.method not in methods:
            self.reply(405, b"405 method not allowed", TEXT_TYPE, request.close)
            return
        handler(self, request)

    def handleRoot(self, request: ParsedRequest) -> None:
        self.reply(200, b"Ollama is running", TEXT_TYPE, request.close, withBody=request.method != "HEAD")

    def handleVersion(self, request: ParsedRequest) -> None:
        self.reply(200, orjson.dumps({"version": VERSION}), close=request.close)

    def handleTags(self, request: ParsedRequest) -> None:
        self.reply(200, self.state.tagsBody, close=request.close)

    def handlePs(self, request: ParsedRequest) -> None:
        self.reply(200, b'{"models":[]}', close=request.close)

    def handleShow(self, request: ParsedRequest) -> None:
        body = self.parseJson(request)
        name = self.state.lookup(body.get("model") or body.get("name")) if body is not None else None
        if name is None:
            self.reply(404, orjson.dumps({"error": "model not found"}), close=request.close)
            return
        entry = tagEntry(name)
        shown = {"license": "", "modelfile": f"FROM {name}\n", "parameters": "", "template": "{{ .Prompt }}",
                 "details": entry["details"], "capabilities": entry["capabilities"], "modified_at": CREATED_AT,
                 "model_info": {"general.architecture": "qwen2", "qwen2.context_length": 32768}}
        self.reply(200, orjson.dumps(shown), close=request.close)

    def handleConfig(self, request: ParsedRequest) -> None:
        body = self.parseJson(request)
        if body is None:
            return
        if "chunkDelayMs" in body:
            self.state.chunkDelay = float(body["chunkDelayMs"]) / 1000.0
        self.reply(200, orjson.dumps({"chunkDelayMs": self.state.chunkDelay * 1000.0,
                                      "requestCount": self.state.requestCount}), close=request.close)

    def parseJson(self, request: ParsedRequest) -> dict[str, Any] | None:
        try:
            body = orjson.loads(request.body) if request.body else {}
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self.reply(400, orjson.dumps({"error": "invalid JSON body"}), close=request.close)
            return None
        return body

    def handleChat(self, request: ParsedRequest) -> None:
        body = self.parseJson(request)
        if body is None:
            return
        name = self.state.lookup(body.get("model"))
        if name is None:
            self.reply(404, orjson.dumps({"error": f"model '{body.get('model')}' not found"}), close=request.close)
        elif not body.get("messages") and not body.get("prompt"):
            loaded = {**chunkObject(name, ""), "done": True, "done_reason": "load"}
            self.reply(200, orjson.dumps(loaded), close=request.close)
        elif body.get("stream") is False:
            self.reply(200, self.state.wholeBodies[name], close=request.close)
        else:
            self.startStream(self.state.streamLines[name], request.close)

    def startStream(self, lines: list[bytes], close: bool) -> None:
        assert self.transport is not None
        head = responseHead(200, NDJSON_TYPE, None, close)
        if self.state.chunkDelay <= 0:
            self.transport.write(head + b"".join(chunked(line) for line in lines) + b"0\r\n\r\n")
            if close:
                self.transport.close()
            return
        self.transport.write(head)
        self.streaming = asyncio.get_running_loop().call_later(self.state.chunkDelay, self.sendNext, lines, 0, close)

    def sendNext(self, lines: list[bytes], index: int, close: bool) -> None:
        self.streaming = None
        if self.transport is None:
            return
        last = index == len(lines) - 1
        self.transport.write(chunked(lines[index]) + (b"0\r\n\r\n" if last else b""))
        if not last:
            delay = self.state.chunkDelay if index < len(lines) - 2 else 0.0
            self.streaming = asyncio.get_running_loop().call_later(delay, self.sendNext, lines, index + 1, close)
        elif close:
            self.transport.close()
        else:
            self.processBuffer()


ROUTES = {
    "/": (("GET", "HEAD"), UpstreamProtocol.handleRoot),
    "/api/version": (("GET",), UpstreamProtocol.handleVersion),
    "/api/tags": (("GET",), UpstreamProtocol.handleTags),
    "/api/ps": (("GET",), UpstreamProtocol.handlePs),
    "/api/show": (("POST",), UpstreamProtocol.handleShow),
    "/api/chat": (("POST",), UpstreamProtocol.handleChat),
    "/api/generate": (("POST",), UpstreamProtocol.handleChat),
    CONTROL_PATH: (("POST",), UpstreamProtocol.handleConfig),
}


async def serve(host: str, port: int, state: UpstreamState) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(state), host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"instant upstream listening on http://{host}:{bound} (models: {', '.join(state.models)}, "
          f"{state.chunks} chunks, {state.chunkDelay * 1000:g} ms pacing)", flush=True)
    async with server:
        await server.serve_forever()


def parseArgs(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instantUpstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=11500)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="content chunks per streamed reply")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="pause before each streamed chunk")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parseArgs(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("the bench upstream binds to loopback only")
    state = UpstreamState(tuple(m.strip() for m in args.models.split(",") if m.strip()), args.chunks,
                          args.chunk_delay_ms)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        runner = asyncio.run
    try:
        runner(serve(args.host, args.port, state))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
