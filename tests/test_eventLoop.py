"""core/eventLoop.py: a busy loop accepts every waiting connection at once (uvloop takes one per iteration), and
uvicorn serves through it. Counted in loop iterations, not timed."""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest
import uvicorn
import uvloop

from core import eventLoop

WAITING_CONNECTIONS = 32
MAX_ITERATIONS = 200


class Counting(asyncio.Protocol):
    def __init__(self, made: list[asyncio.Transport]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)  # type: ignore[arg-type]


async def iterationsToAcceptAll() -> int:
    """Connections that wait in the listen queue while the loop is busy: loop iterations until all are served."""
    loop = asyncio.get_running_loop()
    made: list[asyncio.Transport] = []
    server = await loop.create_server(lambda: Counting(made), "127.0.0.1", 0, backlog=128)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(WAITING_CONNECTIONS)]
    iterations = 0
    try:
        while len(made) < WAITING_CONNECTIONS and iterations < MAX_ITERATIONS:
            await asyncio.sleep(0)  # one loop iteration: poll for I/O, run what is ready
            iterations += 1
    finally:
        for transport in made:
            transport.close()
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()
    assert len(made) == WAITING_CONNECTIONS
    return iterations


def test_acceptAllLoop_takesEveryWaitingConnectionInOneGo() -> None:
    assert uvloop.run(iterationsToAcceptAll(), loop_factory=eventLoop.newEventLoop) <= 4


def test_plainUvloop_takesOneConnectionPerIteration() -> None:
    """Why the loop exists: if this fails, uvloop accepts in a loop again and core/eventLoop.py can go."""
    assert uvloop.run(iterationsToAcceptAll()) >= WAITING_CONNECTIONS // 2


async def closedServerRefuses() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    assert isinstance(server, eventLoop.AcceptAllServer) and server.is_serving()
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    assert not server.is_serving() and server.sockets == ()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_closeStopsAccepting() -> None:
    uvloop.run(closedServerRefuses(), loop_factory=eventLoop.newEventLoop)


async def unixServerIsUvloops(path: str) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    server = await loop.create_server(asyncio.Protocol, sock=sock)
    assert not isinstance(server, eventLoop.AcceptAllServer)
    server.close()
    await server.wait_closed()


def test_otherServersKeepUvloopsOwn(tmp_path) -> None:
    uvloop.run(unixServerIsUvloops(str(tmp_path / "s.sock")), loop_factory=eventLoop.newEventLoop)


async def hello(scope, receive, send) -> None:  # noqa: ANN001 - plain ASGI app
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def test_uvicornServesThroughTheLoop() -> None:
    config = uvicorn.Config(hello, host="127.0.0.1", port=0, loop="core.eventLoop:newEventLoop", http="httptools",
                            lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    sock = eventLoop.listeningSocket("127.0.0.1", 0, 128)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        with httpx.Client(trust_env=False) as client:  # keep-alive: the second request reuses the connection
            assert [client.get(url).text for _ in range(2)] == ["hello", "hello"]
        assert isinstance(server.servers[0], eventLoop.AcceptAllServer)
    finally:
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()
