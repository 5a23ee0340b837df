"""The service's event loop: uvloop, except that a listening socket accepts every waiting connection at once.

libuv (since 1.45, in uvloop 0.18+) accepts one connection per loop iteration and relies on the next poll for the
rest. Under load an iteration takes as long as the work of all open requests (tens of milliseconds at 64 busy
connections), so the k-th new connection waited k iterations before its first request was even read: measured at
concurrency 64 on one core, the first request of the last connections took 2-4.5 s while requests on open
connections took 0.1-0.3 s (docu/performance.md, "Stalls under load"). Plain TCP servers made here accept in a
loop, as asyncio's own selector loop does, and hand each socket to uvloop's transport (same C transport, same
TCP_NODELAY); TLS servers, Unix sockets and unusual arguments keep uvloop's own server.

``uvicorn.run(..., loop="core.eventLoop:newEventLoop")`` uses it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvloop

ACCEPT_BATCH = 512
"""Most connections accepted per wake-up (asyncio's selector loop takes up to the listen backlog)."""
ACCEPT_RETRY_SECONDS = 1.0
"""After an accept error such as EMFILE (too many open files): pause accepting this long instead of spinning."""
logger = logging.getLogger("poweron.server")
ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class AcceptAllServer(asyncio.AbstractServer):
    """A listening TCP socket watched by the loop; each readiness accepts every connection that is waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocolFactory: ProtocolFactory) -> None:
        self.loop, self.sock, self.protocolFactory = loop, sock, protocolFactory
        self.handshakes: set[asyncio.Task] = set()
        self.serving = False
        sock.setblocking(False)
        self._watch()

    def _watch(self) -> None:
        if self.sock.fileno() >= 0 and not self.serving:
            self.loop.add_reader(self.sock.fileno(), self._acceptWaiting)
            self.serving = True

    def _acceptWaiting(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                logger.warning("accepting connections failed (%s); retrying in %g s", exc.strerror or exc,
                               ACCEPT_RETRY_SECONDS)
                self._unwatch()
                self.loop.call_later(ACCEPT_RETRY_SECONDS, self._watch)
                return
            self._serve(connection)

    def _serve(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        task = self.loop.create_task(self.loop.connect_accepted_socket(self.protocolFactory, connection))
        self.handshakes.add(task)
        task.add_done_callback(self._handedOver)

    def _handedOver(self, task: asyncio.Task) -> None:
        self.handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("an accepted connection could not be set up: %s", task.exception())

    def _unwatch(self) -> None:
        if self.serving:
            self.serving = False
            self.loop.remove_reader(self.sock.fileno())

    # asyncio.AbstractServer
    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,) if self.sock.fileno() >= 0 else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return self.serving

    def close(self) -> None:
        """Stop accepting; connections already accepted are left to their protocols (uvicorn shuts them down)."""
        self._unwatch()
        self.sock.close()

    async def wait_closed(self) -> None:
        if self.handshakes:
            await asyncio.gather(*self.handshakes, return_exceptions=True)

    async def start_serving(self) -> None:
        """Serving starts in the constructor."""

    async def serve_forever(self) -> None:
        raise NotImplementedError("the service's server is run by uvicorn")


def listeningSocket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket with SO_REUSEADDR (IPv6 for a host with a colon, as uvicorn binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


class AcceptAllLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop whose plain TCP servers accept all waiting connections at each readiness."""

    async def create_server(self, protocol_factory: ProtocolFactory, host: Any = None, port: Any = None, *,
                            sock: socket.socket | None = None, backlog: int = 100, ssl: Any = None,
                            **kwargs: Any) -> asyncio.AbstractServer:
        plainTcp = sock.family in (socket.AF_INET, socket.AF_INET6) if sock is not None else isinstance(host, str)
        if ssl is not None or kwargs or not plainTcp:
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                                               **kwargs)
        if sock is None:
            sock = listeningSocket(host, port, backlog)
        else:
            sock.listen(backlog)
        return AcceptAllServer(self, sock, protocol_factory)


def newEventLoop() -> asyncio.AbstractEventLoop:
    """The loop factory for uvicorn (``loop="core.eventLoop:newEventLoop"``)."""
    return AcceptAllLoop()
