"""Limits on connections and request heads, below the ASGI app (uvicorn's httptools protocol has none of its own):

- request line plus headers over ``[server] max_header_bytes`` or more than ``max_header_count`` fields -> 431;
- the head not complete ``header_timeout_seconds`` after connecting (or after the first byte of a further request on
  a kept-alive connection) -> 408 (slowloris); a connection that sent nothing is closed without an answer;
- more than ``max_connections`` open connections -> 503 for the new one, closed at once;
- a request that is not valid HTTP -> 400 (uvicorn's own answer had no request id).

Each refusal is answered in the analysis API's error shape with a fresh X-Request-ID and ``Connection: close``,
logged with that id, and the connection is closed: no app code runs for it and nothing more of it is parsed.
Idle kept-alive connections are closed by uvicorn after ``keep_alive_seconds`` (``timeout_keep_alive``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from http import HTTPStatus
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from settings.sections import ServerSettings

logger = logging.getLogger("poweron.connections")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head-size, head-time and connection-count limits (``limits`` is set on the
    subclass ``protocolFor`` makes)."""

    limits: ServerSettings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.refused = False
        self.headerTimer: asyncio.TimerHandle | None = None
        self._startHead()
        if len(self.connections) > self.limits.max_connections:
            self.refuse(503, "too_many_connections", f"The server has {self.limits.max_connections} connections "
                        "open ([server] max_connections); retry shortly", retryAfter=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stopHeaderTimer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.inHead:
            self.headBytes += len(data)
        super().data_received(data)
        if self.inHead and not self.refused and self.headBytes > self.limits.max_header_bytes:
            self._headersTooLarge()

    def _startHead(self) -> None:
        self.inHead = True
        self.headBytes = self.headerCount = 0
        self._stopHeaderTimer()
        self.headerTimer = self.loop.call_later(self.limits.header_timeout_seconds, self._headerTimeout)

    def _stopHeaderTimer(self) -> None:
        if getattr(self, "headerTimer", None) is not None:
            self.headerTimer.cancel()  # type: ignore[union-attr]
            self.headerTimer = None

    def _headerTimeout(self) -> None:
        self.headerTimer = None
        if self.refused or self.transport.is_closing() or not self.inHead:
            return
        if self.headBytes == 0 and self.cycle is None:  # connected and sent nothing: just close
            self.refused = True
            self.transport.close()
            return
        self.refuse(408, "request_timeout", f"The request line and headers did not arrive within "
                    f"{self.limits.header_timeout_seconds:g} s ([server] header_timeout_seconds)")

    def _headersTooLarge(self) -> None:
        self.refuse(431, "headers_too_large", f"The request line and headers are larger than "
                    f"{self.limits.max_header_bytes} bytes ([server] max_header_bytes)")

    def on_message_begin(self) -> None:
        if not self.inHead:  # a further request on a kept-alive connection
            self._startHead()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.refused:
            return
        self.headerCount += 1
        if self.headerCount > self.limits.max_header_count:
            self.refuse(431, "too_many_headers", f"The request has more than {self.limits.max_header_count} header "
                        "fields ([server] max_header_count)")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        headSize = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if headSize > self.limits.max_header_bytes:
            self._headersTooLarge()
            return
        self.inHead = False
        self._stopHeaderTimer()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.refused:
            super().on_message_complete()

    def send_400_response(self, msg: str) -> None:  # noqa: N802 (uvicorn's name)
        """uvicorn's answer to a request it cannot parse, in our shape and with a request id."""
        self.refuse(400, "invalid_http_request", "The request is not valid HTTP/1.1")

    def refuse(self, status: int, code: str, message: str, retryAfter: bool = False) -> None:
        """Answer ``status`` with our error shape and a fresh request id, close the connection, parse no more."""
        self.refused = True
        self._stopHeaderTimer()
        if self.transport.is_closing():
            return
        requestId = uuid.uuid4().hex
        logger.warning("connection refused before routing: %s %s (request %s)", status, code, requestId)
        body = orjson.dumps({"detail": message, "code": code, "requestId": requestId})
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close", f"x-request-id: {requestId}"]
        if retryAfter:
            head.append("retry-after: 2")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        self.transport.close()


def protocolFor(limits: ServerSettings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with these limits."""
    attributes: dict[str, Any] = {"limits": limits}
    return type("PowerOnHttpProtocol", (GuardedHttpToolsProtocol,), attributes)
