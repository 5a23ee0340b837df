"""Issue 17: huge and slow request heads and idle connections, against the real service (python app.py) over raw
sockets on loopback: 431 for too large or too many headers, 408 for a head that does not arrive in time
(slowloris), idle connections closed, a cap on open connections; the service serves normally afterwards."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.conftest import ServiceProcess

HEADER_TIMEOUT = 1.0
KEEP_ALIVE = 1.0
MAX_CONNECTIONS = 12
LIMITS = {"PRIVATE_LLM_SERVER__HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
          "PRIVATE_LLM_SERVER__KEEP_ALIVE_SECONDS": str(KEEP_ALIVE),
          "PRIVATE_LLM_SERVER__MAX_CONNECTIONS": str(MAX_CONNECTIONS),
          "PRIVATE_LLM_SERVER__MAX_HEADER_BYTES": "8192",
          "PRIVATE_LLM_SERVER__MAX_HEADER_COUNT": "32"}
WAIT = HEADER_TIMEOUT + 4.0
"""Upper bound for any one socket read in these tests."""


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[ServiceProcess]:
    from tests.conftest import TEST_INI

    path = tmp_path_factory.mktemp("limits") / "config.ini"
    path.write_text(TEST_INI, encoding="utf-8")
    started = ServiceProcess(path, LIMITS).start()
    yield started
    started.stop()


def connect(service: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=WAIT)
    return sock


def readAll(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def statusAndBody(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, orjson.loads(body) if body else {}


def sendIgnoringReset(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server refused and closed while we were still sending


def assertServesNormally(service: ServiceProcess) -> None:
    assert httpx.get(service.baseUrl + "/health/liveliness", timeout=5).status_code == 200


def test_too_large_headers_are_431_and_closed(service: ServiceProcess) -> None:
    with connect(service) as sock:
        sendIgnoringReset(sock, b"GET /health/liveliness HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        status, headers, body = statusAndBody(readAll(sock))
    assert status == 431 and body["code"] == "headers_too_large" and "max_header_bytes" in body["detail"]
    assert headers["connection"] == "close" and len(headers["x-request-id"]) == 32
    assert body["requestId"] == headers["x-request-id"]
    assertServesNormally(service)


def test_a_huge_header_stream_is_cut_early(service: ServiceProcess) -> None:
    """16 MB of one header line: refused after the limit, not parsed to the end."""
    with connect(service) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, answer = 0, b""
        while sent < 16 * 1024 * 1024:
            try:
                sock.sendall(b"a" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 65536
            sock.settimeout(0.0)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            finally:
                sock.settimeout(WAIT)
            if answer:
                break
        if not answer:
            answer = readAll(sock)
    assert sent < 16 * 1024 * 1024, "the server read the whole 16 MB header"
    assert answer.startswith(b"HTTP/1.1 431 ")
    assertServesNormally(service)


def test_a_malformed_request_is_400_with_a_request_id(service: ServiceProcess) -> None:
    with connect(service) as sock:
        sock.sendall(b"GET /health/liveliness HTTP/1.1\r\nHost x\r\n\r\n")
        status, headers, body = statusAndBody(readAll(sock))
    assert status == 400 and body["code"] == "invalid_http_request" and len(headers["x-request-id"]) == 32
    assertServesNormally(service)


def test_too_many_headers_are_431(service: ServiceProcess) -> None:
    fields = b"".join(b"X-F%d: 1\r\n" % index for index in range(40))
    with connect(service) as sock:
        sock.sendall(b"GET /health/liveliness HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        status, _, body = statusAndBody(readAll(sock))
    assert status == 431 and body["code"] == "too_many_headers"


def test_slow_headers_get_408_and_are_closed(service: ServiceProcess) -> None:
    started = time.monotonic()
    with connect(service) as sock:
        sock.sendall(b"GET /health/liveliness HTTP/1.1\r\nHost: x\r\n")
        for _ in range(int(HEADER_TIMEOUT * 10) + 20):  # one more header byte every 0.1 s: never completes in time
            time.sleep(0.1)
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            if time.monotonic() - started > HEADER_TIMEOUT + 1.5:
                break
        status, headers, body = statusAndBody(readAll(sock))
    assert status == 408 and body["code"] == "request_timeout" and "x-request-id" in headers
    assert time.monotonic() - started < WAIT
    assertServesNormally(service)


def test_a_silent_connection_is_closed(service: ServiceProcess) -> None:
    started = time.monotonic()
    with connect(service) as sock:
        assert readAll(sock) == b""
    assert HEADER_TIMEOUT * 0.5 < time.monotonic() - started < WAIT


def test_an_idle_kept_alive_connection_is_closed(service: ServiceProcess) -> None:
    with connect(service) as sock:
        sock.sendall(b"GET /health/liveliness HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        answer = readAll(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"I'm alive!")
    assert time.monotonic() - started < KEEP_ALIVE + 2.5  # uvicorn's default keep-alive is 5 s


def test_the_connection_cap_refuses_more_and_recovers(service: ServiceProcess) -> None:
    held = [connect(service) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with connect(service) as extra:
            status, headers, body = statusAndBody(readAll(extra))
        assert status == 503 and body["code"] == "too_many_connections" and headers["retry-after"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assertServesNormally(service)


def test_many_slowloris_connections_are_all_dropped(service: ServiceProcess) -> None:
    """More slow clients than the cap: the extra ones are refused at once, the rest get 408 in time; afterwards the
    service answers."""
    sockets = [connect(service) for _ in range(MAX_CONNECTIONS * 2)]
    try:
        for sock in sockets:
            sendIgnoringReset(sock, b"GET / HTTP/1.1\r\nHost: x\r\n")
        statuses = [statusAndBody(readAll(sock))[0] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert set(statuses) <= {408, 503} and 408 in statuses and 503 in statuses, statuses
    assertServesNormally(service)
