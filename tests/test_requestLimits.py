"""Request limits: body size from Content-Length and while streaming (chunked or lying clients), per-file size,
image pixels, and the refusal of remote image URLs."""

from __future__ import annotations

import base64
import socket
import struct
import time
import zlib

import httpx
import orjson
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request

from app import createApp
from core.errors import ServiceError
from guard.requestLimits import checkFileSize, checkImagePixels, describeBytes, rejectRemoteImageUrl
from guard.security import requireOpenAiKey
from tests.conftest import OPENAI_KEY
from tests.liveServer import liveServer
from tests.ollamaStub import StubServer

LIMIT = 4096
CHUNK = 1024
AUTH = (b"authorization", f"Bearer {OPENAI_KEY}".encode())


@pytest.fixture
def limitedApp(makeSettings) -> FastAPI:
    """The service with max_body_bytes = 4 KiB and a test route that reads the whole body."""
    app = createApp(makeSettings(limits={"max_body_bytes": LIMIT}))
    router = APIRouter(prefix="/v1/_test")

    @router.post("/echo")
    async def echo(request: Request) -> dict:
        return {"received": len(await request.body())}

    app.include_router(router, dependencies=[Depends(requireOpenAiKey)])
    return app


class CountingBody:
    """An ASGI receive that hands out ``chunks`` body messages (endless when None) and counts what was pulled."""

    def __init__(self, chunks: int | None) -> None:
        self.chunks = chunks
        self.calls = 0
        self.bytesPulled = 0

    async def __call__(self) -> dict:
        self.calls += 1
        if self.chunks is not None and self.calls > self.chunks:
            return {"type": "http.disconnect"}
        more = self.chunks is None or self.calls < self.chunks
        self.bytesPulled += CHUNK
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": more}


async def _callAsgi(app: FastAPI, headers: list[tuple[bytes, bytes]], receive: CountingBody) -> tuple[int, dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/_test/echo", "raw_path": b"/v1/_test/echo", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), AUTH, *headers], "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], orjson.loads(body)


async def test_declaredLengthOverTheLimitIsRefusedWithoutReading(limitedApp) -> None:
    receive = CountingBody(chunks=None)
    status, body = await _callAsgi(limitedApp, [(b"content-length", str(LIMIT + 1).encode())], receive)
    assert status == 413
    assert receive.calls == 0
    assert "4 KiB (4096 bytes)" in body["error"]["message"]
    assert body["error"]["code"] == "request_too_large"


async def test_chunkedBodyStopsBeingReadAtTheLimit(limitedApp) -> None:
    receive = CountingBody(chunks=None)  # no Content-Length, never-ending body
    status, body = await _callAsgi(limitedApp, [(b"transfer-encoding", b"chunked")], receive)
    assert status == 413
    assert "[limits] max_body_bytes" in body["error"]["message"]
    assert receive.bytesPulled == LIMIT + CHUNK, "read past the message that crossed the limit"


async def test_bodyThatUnderstatesItsLengthIsCutAtTheLimit(limitedApp) -> None:
    receive = CountingBody(chunks=None)
    status, _ = await _callAsgi(limitedApp, [(b"content-length", b"10")], receive)
    assert status == 413
    assert receive.bytesPulled == LIMIT + CHUNK


async def test_bodiesUpToTheLimitPass(limitedApp) -> None:
    receive = CountingBody(chunks=LIMIT // CHUNK)
    status, body = await _callAsgi(limitedApp, [(b"content-length", str(LIMIT).encode())], receive)
    assert status == 200 and body == {"received": LIMIT}


async def test_malformedContentLengthIsA400(limitedApp) -> None:
    receive = CountingBody(chunks=1)
    status, body = await _callAsgi(limitedApp, [(b"content-length", b"12abc")], receive)
    assert status == 400 and "Content-Length" in body["error"]["message"]
    assert receive.calls == 0


def _readResponse(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(rest) < int(headers.get("content-length", 0)):
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest


def test_realServerAnswers413BeforeAChunkedUploadEnds(limitedApp) -> None:
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + OPENAI_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % CHUNK + b" " * CHUNK + b"\r\n"
    with liveServer(limitedApp) as baseUrl:
        with socket.create_connection(("127.0.0.1", int(baseUrl.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(request + chunk * (LIMIT // CHUNK + 1))  # past the limit, and the body never ends
            status, headers, body = _readResponse(sock)
            closed = sock.recv(1) == b""
    assert status == 413
    assert "max_body_bytes" in orjson.loads(body)["error"]["message"]
    assert headers.get("connection") == "close" and closed


def test_realServerRefusesAHugeDeclaredBodyBeforeItIsSent(limitedApp) -> None:
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer " + OPENAI_KEY.encode() + b"\r\nContent-Length: 1073741824\r\n\r\n")
    with liveServer(limitedApp) as baseUrl:
        with socket.create_connection(("127.0.0.1", int(baseUrl.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(request)
            status, _, body = _readResponse(sock)
    assert status == 413 and "4 KiB" in orjson.loads(body)["error"]["message"]


def test_realServerDiscardsASlightlyTooLargeBodySoTheClientReadsThe413(limitedApp) -> None:
    """The body arrives after the 413 was sent: the server must neither reset the connection (closing a socket with
    unread bytes sends RST and the client loses the 413) nor treat the body as a new request; the connection stays
    usable."""
    body = b" " * (LIMIT + LIMIT // 2)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + OPENAI_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    health = b"GET /health/liveliness HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with liveServer(limitedApp) as baseUrl:
        with socket.create_connection(("127.0.0.1", int(baseUrl.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(head)
            time.sleep(0.3)  # the 413 is sent now; an old server has closed the socket already
            sock.sendall(body)
            time.sleep(0.3)  # a reset would have arrived by now and dropped the unread 413
            status, headers, answer = _readResponse(sock)
            sock.sendall(health)
            nextStatus, _, _ = _readResponse(sock)
    assert status == 413 and "4 KiB" in orjson.loads(answer)["error"]["message"]
    assert headers.get("connection") != "close"
    assert nextStatus == 200


def test_realServerClosesAfterRefusingAFarTooLargeDeclaredBody(limitedApp) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + OPENAI_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (LIMIT * 3))
    with liveServer(limitedApp) as baseUrl:
        with socket.create_connection(("127.0.0.1", int(baseUrl.rsplit(":", 1)[1])), timeout=10) as sock:
            sock.sendall(head)
            status, headers, _ = _readResponse(sock)
            closed = sock.recv(1) == b""
    assert status == 413 and headers.get("connection") == "close" and closed


# --- helpers the route handlers call --------------------------------------------------------------------------------

def test_fileSizeCheckNamesTheLimit(makeSettings) -> None:
    settings = makeSettings(limits={"max_file_bytes": 2 * 1024 * 1024})
    checkFileSize(2 * 1024 * 1024, settings, "ok.pdf")
    with pytest.raises(ServiceError) as caught:
        checkFileSize(3 * 1024 * 1024, settings, "scan.pdf", param="file")
    error = caught.value
    assert error.status == 413 and error.param == "file" and error.code == "file_too_large"
    assert "'scan.pdf' is 3 MiB" in error.message and "2 MiB (2097152 bytes)" in error.message


def test_imagePixelCheckNamesTheLimit(makeSettings) -> None:
    settings = makeSettings(limits={"max_image_pixels": 1_000_000})
    checkImagePixels(1000, 1000, settings)
    with pytest.raises(ServiceError) as caught:
        checkImagePixels(1001, 1000, settings)
    assert caught.value.status == 413
    assert "1001x1000 = 1,001,000 pixels; the limit is 1,000,000" in caught.value.message


@pytest.mark.parametrize("url, fragment", [
    ("https://cdn.example.com/x.png", "never fetches https URLs"),
    ("HTTP://10.0.0.5/x.png", "never fetches http URLs"),
    ("file:///etc/passwd", "'file:' URLs are not accepted"),
    ("x.png", "no URL scheme"),
])
def test_onlyDataUrlsAreAcceptedForImages(url: str, fragment: str) -> None:
    rejectRemoteImageUrl("data:image/png;base64,iVBORw0KGgo=")
    with pytest.raises(ServiceError) as caught:
        rejectRemoteImageUrl(url, param="messages[0].content[1].image_url.url")
    assert caught.value.status == 400 and fragment in caught.value.message
    assert "data URL" in caught.value.message and caught.value.param == "messages[0].content[1].image_url.url"


def test_describeBytes() -> None:
    assert describeBytes(67108864) == "64 MiB (67108864 bytes)"
    assert describeBytes(1536) == "1.5 KiB (1536 bytes)"
    assert describeBytes(100) == "100 bytes"


def _pngHeaderOnly(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no pixel data (a pixel bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5_000, 20_000])  # over our limit; 20,000 is also over Pillow's own bomb limit
async def test_pixelBombInAChatImageIsRefusedBeforeDecoding(makeSettings, side: int) -> None:
    with StubServer() as stub:
        app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}, limits={"max_image_pixels": 10_000_000}))
        image = base64.b64encode(_pngHeaderOnly(side, side)).decode()
        payload = {"model": "poweron-vision-general", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "read this"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://testserver") as client:
            response = await client.post("/v1/chat/completions", json=payload,
                                         headers={"Authorization": f"Bearer {OPENAI_KEY}"})
        assert not [r for r in stub.state.requests if r.get("path") == "/api/chat"]
    message = response.json()["error"]["message"]
    assert response.status_code == 413 and "max_image_pixels" in message
    if side == 5_000:
        assert "5000x5000 = 25,000,000 pixels; the limit is 10,000,000" in message
