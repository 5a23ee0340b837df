"""Slow request bodies (issue 17 follow-up), against the real service (python app.py, and uvicorn's own CLI with the
guard as its protocol) over raw sockets on loopback: a body that stalls or trickles after its headers gets 408
``body_timeout`` in time, its request task ends (the key's concurrency slot is free again, the access line says
408), and a slow but steady upload of a large body still succeeds."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import (OPENAI_KEY, REPO_ROOT, TEST_INI, ServiceProcess, freePort, guardedEnv, stopProcess,
                            waitForHttp)
from guard.connectionGuard import protocolFor
from settings.sections import ServerSettings
from tests.liveServer import liveServer
from tests.ollamaStub import StubServer

BODY_TIMEOUT = 1.0
MIN_RATE = 4096
LIMITS = {"PRIVATE_LLM_SERVER__BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
          "PRIVATE_LLM_SERVER__BODY_MIN_RATE_BYTES": str(MIN_RATE),
          "PRIVATE_LLM_RATELIMIT__MAX_CONCURRENT_PER_KEY": "1"}
MARGIN = 2.5
"""Slack on top of the deadline for a loaded 2-core machine."""
OPENAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}
CHAT = orjson.dumps({"model": "poweron-text-general", "messages": [{"role": "user", "content": "hello"}]})


@pytest.fixture(scope="module")
def service(stub: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    ini = tmp_path_factory.mktemp("slowbody") / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    with ServiceProcess(ini, {"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl, **LIMITS}) as process:
        deadline = time.monotonic() + 15
        while not httpx.get(process.baseUrl + "/v1/models", headers=OPENAI_HEADERS).json()["data"]:
            assert time.monotonic() < deadline, "the service never listed the stub's models"
            time.sleep(0.05)
        yield process
    assert "Traceback" not in process.logText(), process.logText()[-3000:]


def chatHead(port: int, length: int | None, key: bool = True, requestId: str | None = None) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if key:
        lines.append(f"Authorization: Bearer {OPENAI_KEY}")
    if requestId:
        lines.append(f"X-Request-ID: {requestId}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def trickle(sock: socket.socket, pieces: Iterator[bytes], pause: float, limit: float) -> bytes:
    """Send one piece every ``pause`` seconds until the server answers or closes, or ``limit`` seconds pass;
    returns what the server sent (empty if nothing)."""
    started = time.monotonic()
    sock.settimeout(pause)
    received = b""
    for piece in pieces:
        try:
            sock.sendall(piece)
            received += sock.recv(65536)
            if received:
                break
        except socket.timeout:
            pass
        except (BrokenPipeError, ConnectionResetError):
            break
        if time.monotonic() - started > limit:
            break
    sock.settimeout(MARGIN)
    return received + readRest(sock)


def readRest(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def parsed(answer: bytes) -> tuple[int, dict[str, str], dict]:
    assert answer, "the server sent nothing"
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, orjson.loads(body) if body else {}


def accessLine(service: ServiceProcess, requestId: str) -> dict:
    for _ in range(50):
        for line in service.logText().splitlines():
            start = line.find("{")
            if start >= 0 and f'"requestId":"{requestId}"' in line.replace(" ", ""):
                return orjson.loads(line[start:])
        time.sleep(0.05)
    raise AssertionError(f"no access line for {requestId}")


def slotIsFree(service: ServiceProcess) -> bool:
    """True when a request with the same key is admitted (the cap is 1 concurrent request per key)."""
    return httpx.get(service.baseUrl + "/v1/models", headers=OPENAI_HEADERS, timeout=5).status_code == 200


def test_a_trickled_body_gets_408_and_frees_the_key_slot(service: ServiceProcess) -> None:
    """One byte every 0.2 s never pauses as long as the idle timeout, but falls under the minimum rate."""
    requestId = "slow-body-trickle-1"
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(chatHead(service.port, 10_000_000, requestId=requestId))
        time.sleep(0.3)
        assert not slotIsFree(service), "the trickling request should hold the key's only slot"
        started = time.monotonic()
        answer = trickle(sock, iter(lambda: b"x", None), 0.2, BODY_TIMEOUT + MARGIN + 2)
        elapsed = time.monotonic() - started
        status, headers, body = parsed(answer)
        assert status == 408 and body["code"] == "body_timeout", answer
        assert "body_min_rate_bytes" in body["detail"] and headers["connection"] == "close"
        assert headers["x-request-id"] == body["requestId"] == requestId
        assert elapsed < BODY_TIMEOUT + MARGIN
        freed = time.monotonic()
        while not slotIsFree(service):
            assert time.monotonic() - freed < 2, "the key's slot stayed taken after the 408"
            time.sleep(0.05)
    line = accessLine(service, requestId)
    assert (line["status"], line["error"], line["key"]) == (408, "body_timeout", "cursor")


def test_a_stalled_body_gets_408(service: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(chatHead(service.port, 1000) + b'{"model": ')
        started = time.monotonic()
        sock.settimeout(BODY_TIMEOUT + MARGIN)
        status, headers, body = parsed(readRest(sock))
        elapsed = time.monotonic() - started
    assert status == 408 and body["code"] == "body_timeout" and "body_timeout_seconds" in body["detail"]
    assert len(headers["x-request-id"]) >= 16
    assert BODY_TIMEOUT * 0.8 < elapsed < BODY_TIMEOUT + MARGIN


def test_a_trickled_chunked_body_gets_408(service: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(chatHead(service.port, None))
        started = time.monotonic()
        answer = trickle(sock, iter(lambda: b"1\r\nx\r\n", None), 0.2, BODY_TIMEOUT + MARGIN + 2)
        elapsed = time.monotonic() - started
    status, _, body = parsed(answer)
    assert status == 408 and body["code"] == "body_timeout" and elapsed < BODY_TIMEOUT + MARGIN
    assert slotIsFree(service)


def test_a_slow_but_steady_large_upload_succeeds(service: ServiceProcess) -> None:
    """300 KB at about 60 KB/s: five times the body timeout in all, never idle, well above the minimum rate."""
    body = CHAT + b" " * 300_000  # JSON allows trailing whitespace
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(chatHead(service.port, len(body)))
        started = time.monotonic()
        for offset in range(0, len(body), 6000):
            sock.sendall(body[offset:offset + 6000])
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        sock.settimeout(15)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    status, _, reply = parsed(answer)
    assert elapsed > BODY_TIMEOUT * 4
    assert status == 200 and reply["choices"][0]["message"]["content"], answer[:500]


def test_a_body_trickled_after_the_answer_is_cut(service: ServiceProcess) -> None:
    """Answered without reading the body (401: no key), then the client trickles the declared body: the connection is
    closed, not kept open as long as bytes come."""
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(chatHead(service.port, 10_000_000, key=False))
        started = time.monotonic()
        sock.settimeout(MARGIN)
        answer = sock.recv(65536)  # the 401 (one small segment)
        sent = 0
        while time.monotonic() - started < BODY_TIMEOUT + MARGIN + 1:
            try:
                sock.sendall(b"x")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(65536) == b"":
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 401 ") and sent >= 4
    assert elapsed < BODY_TIMEOUT + MARGIN, "the connection stayed open while the unread body trickled"


def test_uvicorn_cli_with_the_guard_protocol(tmp_path) -> None:
    """``uvicorn app:app --http app:WorkerProtocol`` (docu/security.md) runs with the guard: slow bodies get 408."""
    ini = tmp_path / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    port = freePort()
    env = guardedEnv({**os.environ, "PRIVATE_LLM_CONFIG": str(ini), **LIMITS})
    log = open(tmp_path / "uvicorn.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "app:app", "--http", "app:WorkerProtocol",
                                "--loop", "core.eventLoop:newEventLoop",
                                "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--no-server-header"],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        waitForHttp(f"http://127.0.0.1:{port}/health/liveliness", 30, process)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(chatHead(port, 1000) + b"{")
            sock.settimeout(BODY_TIMEOUT + MARGIN)
            status, _, body = parsed(readRest(sock))
        assert status == 408 and body["code"] == "body_timeout"
    finally:
        stopProcess(process)
        log.close()


# --- the clock runs only while the server reads (in-process: the guard's protocol in front of a tiny ASGI app) -------

APP_DELAY = BODY_TIMEOUT * 2.5


async def lateReader(scope: dict, receive: Any, send: Any) -> None:
    """Takes APP_DELAY seconds before it reads the body (as a handler waiting for something), then answers its size."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(APP_DELAY)
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def lateServer() -> Iterator[int]:
    limits = ServerSettings(body_timeout_seconds=BODY_TIMEOUT, body_min_rate_bytes=MIN_RATE)
    with liveServer(lateReader, http=protocolFor(limits)) as baseUrl:
        yield int(baseUrl.rsplit(":", 1)[1])


def plainHead(port: int, length: int, *extra: str) -> bytes:
    return "\r\n".join(["POST /upload HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {length}", *extra,
                        "", ""]).encode()


def test_time_the_app_holds_the_body_back_is_not_the_clients(lateServer: int) -> None:
    """The client sends 1 MB at once; uvicorn stops reading after 64 KiB until the app (busy for 2.5 body timeouts)
    takes it. That pause is the server's, so the upload succeeds."""
    body = b"x" * 1_000_000
    with socket.create_connection(("127.0.0.1", lateServer)) as sock:
        sock.sendall(plainHead(lateServer, len(body)))
        sock.settimeout(APP_DELAY + 10)
        sock.sendall(body)
        status, _, size = parsed(readOne(sock))
    assert (status, size) == (200, len(body))


def test_a_pending_100_continue_is_not_the_clients_time(lateServer: int) -> None:
    """With ``Expect: 100-continue`` the client waits for the server's go-ahead, which comes when the app reads."""
    with socket.create_connection(("127.0.0.1", lateServer)) as sock:
        sock.sendall(plainHead(lateServer, 5, "Expect: 100-continue"))
        sock.settimeout(APP_DELAY + 10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"hello")
        status, _, size = parsed(readOne(sock))
    assert (status, size) == (200, 5)


def readOne(sock: socket.socket) -> bytes:
    """One answer with a Content-Length (or what came before the connection closed)."""
    answer = b""
    while True:
        head, found, body = answer.partition(b"\r\n\r\n")
        if found:
            lengths = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n")
                       if line.startswith(b"content-length:")]
            if lengths and len(body) >= int(lengths[0]):
                return answer
        data = sock.recv(65536)
        if not data:
            return answer
        answer += data
