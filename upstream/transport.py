"""A lean HTTP/1.1 keep-alive transport for httpx, mounted for the local Ollama daemon only.

httpcore's pool polls every pooled socket on each request; measured on the 2-core target machine that costs
0.5-1.5 ms of CPU per Ollama call, more than the whole rest of a /v1/chat/completions request. This transport
keeps idle connections in a list, parses responses with httptools (the parser uvicorn uses) and hands body chunks
to httpx as they arrive, at a few tens of microseconds per call. Semantics callers rely on are kept: httpx's
exception types (ConnectError, ConnectTimeout, PoolTimeout, ReadTimeout, RemoteProtocolError), per-request
timeouts from ``request.extensions["timeout"]``, and closing a response before its end closes the connection
(so Ollama stops generating). Requests it does not handle (HEAD, https, streamed request bodies) go to httpx's
standard transport.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

FAST_METHODS = frozenset({"GET", "POST", "PUT", "DELETE"})
HIGH_WATER_BYTES = 1 << 20
"""Buffered response bytes above which the socket stops reading until the consumer catches up."""
INCOMPLETE_MESSAGE = "Server disconnected without sending a complete response"
STALE_RETRY_WINDOW_SECONDS = 0.5
"""A pooled connection that the server closes this soon after the request was sent, before any byte of an answer,
was stale (closed while idle): the request is sent once more. A later close means the server had the request and
went away while working on it (a crash or restart): that fails (502) instead of replaying the request."""
ConnectionKey = tuple[str, int]


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection: writes a request, parses the response into status, headers and body chunks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idleSince = 0.0
        self.paused = False
        self.waiter: asyncio.Future | None = None
        self.reset()

    def reset(self) -> None:
        """Ready for the next response on this connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.headersDone = self.complete = self.receivedAny = self.keepAlive = False
        self.error: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.receivedAny = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"Invalid HTTP response from upstream: {exc}")
            self.close()
        if self.buffered > HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            self.error = httpx.RemoteProtocolError(INCOMPLETE_MESSAGE)
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keepAlive = self.parser.should_keep_alive()  # only valid until the message is complete
        self.headersDone = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # used by the transport
    def send(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise httpx.RemoteProtocolError(INCOMPLETE_MESSAGE)
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return self.complete and self.keepAlive and not self.closed and not self.chunks

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _timedOut(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(httpx.ReadTimeout("Upstream did not send data in time"))

    async def _wait(self, timeout: float | None) -> None:
        self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._timedOut) if timeout is not None else None
        try:
            await self.waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    async def readHead(self, timeout: float | None) -> None:
        while not self.headersDone:
            if self.error is not None:
                raise self.error
            await self._wait(timeout)

    def _drainChunks(self) -> list[bytes]:
        chunks = list(self.chunks)
        self.chunks.clear()
        return chunks

    async def nextChunk(self, timeout: float | None) -> bytes | None:
        """The body bytes that have arrived since the last call (all chunks of the chunked encoding that are here:
        what arrived together is passed on together); None at the end of the body."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            await self._wait(timeout)
        chunk = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self._drainChunks())
        self.buffered -= len(chunk)
        if self.paused and self.buffered < HIGH_WATER_BYTES // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk


class UpstreamResponseStream(httpx.AsyncByteStream):
    """The body of one response; closing it early closes the connection, a complete one goes back to the pool."""

    def __init__(self, pool: UpstreamTransport, connection: UpstreamConnection, key: ConnectionKey,
                 readTimeout: float | None) -> None:
        self.pool = pool
        self.connection = connection
        self.key = key
        self.readTimeout = readTimeout
        self.released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.connection.nextChunk(self.readTimeout)) is not None:
            yield chunk

    async def aclose(self) -> None:
        if not self.released:  # no await before the release: safe under cancellation
            self.released = True
            self.pool.release(self.connection, self.key)


class LeanResponse:
    """A response read straight from the pool, without httpx's client and response layers (measured at 64
    concurrent calls: 0.08 ms of CPU per call instead of 0.41 through httpx.AsyncClient, bench/transportAb.py).
    The parts OllamaClient uses of httpx.Response: ``status_code``, ``headers``, ``url``, ``aiter_bytes()``,
    ``aread()``/``content``, ``aclose()``; closing it before the end of the body closes the connection."""

    def __init__(self, url: httpx.URL, connection: UpstreamConnection, stream: UpstreamResponseStream) -> None:
        self.url, self.stream = url, stream
        self.status_code = connection.status
        self.headers = connection.headers
        self.content = b""

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self.stream.__aiter__()

    async def aread(self) -> bytes:
        try:
            self.content = b"".join([chunk async for chunk in self.stream])
        finally:
            await self.stream.aclose()
        return self.content

    async def finish(self, timeout: float) -> None:
        """After the last line the caller needs: read what is left of the body (the chunked terminator, which
        Ollama writes after its done line) for at most ``timeout`` s, so that the connection can be kept."""
        try:
            while await self.stream.connection.nextChunk(timeout) is not None:
                pass
        except httpx.HTTPError:  # not in time or broken: the connection is closed when the response is
            pass

    async def aclose(self) -> None:
        await self.stream.aclose()


def _requestHead(request: httpx.Request) -> bytes:
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Keep-alive pool of UpstreamConnections (at most ``maxConnections``), with httpx's timeouts and errors."""

    def __init__(self, maxConnections: int, fallback: httpx.AsyncBaseTransport, keepaliveExpiry: float = 60.0,
                 hosts: set[ConnectionKey] | None = None) -> None:
        self.maxConnections = maxConnections
        self.fallback = fallback
        self.keepaliveExpiry = keepaliveExpiry
        self.hosts = hosts
        """Hosts served by this transport (the Ollama upstreams); None = every plain-http host it is mounted for."""
        self.idle: dict[ConnectionKey, list[UpstreamConnection]] = {}
        self.open = 0
        self.slotWaiters: collections.deque[asyncio.Future] = collections.deque()

    def serves(self, baseUrl: str) -> bool:
        """True when calls to this upstream URL take this transport (plain http, one of ``hosts``)."""
        key = hostKey(baseUrl)
        return key is not None and (self.hosts is None or key in self.hosts)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (request.method not in FAST_METHODS or request.url.scheme != "http"
                or not isinstance(request.stream, httpx.ByteStream)):
            return await self.fallback.handle_async_request(request)
        key = (request.url.host, request.url.port or 80)
        if self.hosts is not None and key not in self.hosts:
            return await self.fallback.handle_async_request(request)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        data = _requestHead(request) + request.content
        connection = await self._exchange(key, data, timeouts)
        return httpx.Response(connection.status, headers=connection.headers,
                              stream=UpstreamResponseStream(self, connection, key, timeouts.get("read")),
                              extensions={"http_version": b"HTTP/1.1"})

    async def send(self, method: str, url: httpx.URL, content: bytes | None,
                   timeouts: dict[str, Any]) -> LeanResponse:
        """One call without httpx's client layer: ``Host``, and for a body ``Content-Type: application/json`` and
        ``Content-Length``; same pool, timeouts and httpx exceptions as ``handle_async_request``."""
        key = (url.host, url.port or 80)
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode("ascii"), url.raw_path, url.netloc)
        if content is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(content)
        connection = await self._exchange(key, head + b"\r\n" + (content or b""), timeouts)
        return LeanResponse(url, connection, UpstreamResponseStream(self, connection, key, timeouts.get("read")))

    async def _exchange(self, key: ConnectionKey, data: bytes, timeouts: dict[str, Any]) -> UpstreamConnection:
        """Send the request and wait for the response head; once more on a fresh connection when a pooled one
        turned out to be stale (closed by the server at once, before it answered anything)."""
        while True:
            connection = await self._acquire(key, timeouts)
            sentAt = connection.loop.time()
            try:
                connection.send(data)
                await connection.readHead(timeouts.get("read"))
                return connection
            except httpx.RemoteProtocolError:
                self.discard(connection)
                stale = connection.reused and not connection.receivedAny
                if not stale or connection.loop.time() - sentAt > STALE_RETRY_WINDOW_SECONDS:
                    raise
            except BaseException:
                self.discard(connection)
                raise

    async def _acquire(self, key: ConnectionKey, timeouts: dict[str, Any]) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        while True:
            connection = self._takeIdle(key, loop.time())
            if connection is not None:
                return connection
            if self.open < self.maxConnections or self._closeOneIdle():
                self.open += 1
                try:
                    return await self._connect(loop, key, timeouts.get("connect"))
                except BaseException:
                    self._freeSlot()
                    raise
            await self._waitForSlot(loop, timeouts.get("pool"))

    def _takeIdle(self, key: ConnectionKey, now: float) -> UpstreamConnection | None:
        idle = self.idle.get(key)
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idleSince < self.keepaliveExpiry:
                connection.reused = True
                return connection
            connection.close()
            self.open -= 1
        return None

    def _closeOneIdle(self) -> bool:
        for idle in self.idle.values():
            if idle:
                idle.pop(0).close()
                self.open -= 1
                return True
        return False

    async def _connect(self, loop: asyncio.AbstractEventLoop, key: ConnectionKey,
                       timeout: float | None) -> UpstreamConnection:
        connection = UpstreamConnection(loop)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: connection, key[0], key[1]), timeout)
        except asyncio.TimeoutError:
            raise httpx.ConnectTimeout(f"Connecting to {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"Cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from None
        return connection

    async def _waitForSlot(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        waiter = loop.create_future()
        self.slotWaiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise httpx.PoolTimeout("No upstream connection became free in time") from None
        finally:
            if waiter in self.slotWaiters:
                self.slotWaiters.remove(waiter)

    def _wakeWaiter(self) -> None:
        while self.slotWaiters:
            waiter = self.slotWaiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _freeSlot(self) -> None:
        self.open -= 1
        self._wakeWaiter()

    def release(self, connection: UpstreamConnection, key: ConnectionKey) -> None:
        """A response is finished with: keep its connection when it was read to the end, else close it."""
        if not connection.reusable:
            self.discard(connection)
            return
        connection.reset()
        connection.idleSince = connection.loop.time()
        self.idle.setdefault(key, []).append(connection)
        self._wakeWaiter()

    def discard(self, connection: UpstreamConnection) -> None:
        connection.close()
        self._freeSlot()

    async def aclose(self) -> None:
        for idle in self.idle.values():
            for connection in idle:
                connection.close()
        self.open -= sum(len(idle) for idle in self.idle.values())
        self.idle.clear()
        await self.fallback.aclose()


def hostKey(baseUrl: str) -> ConnectionKey | None:
    """The (host, port) a plain-http upstream URL connects to (None for https)."""
    url = httpx.URL(baseUrl)
    if url.scheme != "http" or not url.host:
        return None
    return (url.host, url.port or 80)


def allowFastUpstreams(transport: UpstreamTransport | None, urls: list[str]) -> None:
    """Serve these plain-http upstream URLs through the lean transport (https ones keep httpx's)."""
    if transport is None or transport.hosts is None:
        return
    transport.hosts.update(key for key in map(hostKey, urls) if key is not None)


def mountPattern(baseUrl: str) -> str | None:
    """The httpx mount key for a plain-http upstream URL (None for https: those keep the standard transport)."""
    url = httpx.URL(baseUrl)
    if url.scheme != "http" or not url.host:
        return None
    return f"http://{url.netloc.decode('ascii')}"
