"""Limits on connections and request heads, below the ASGI app (uvicorn's httptools protocol has none of its own):

- request line plus headers over ``[server] max_header_bytes`` or more than ``max_header_count`` fields -> 431;
- the head not complete ``header_timeout_seconds`` after connecting (or after the first byte of a further request on
  a kept-alive connection) -> 408 (slowloris); a connection that sent nothing is closed without an answer;
- more than ``max_connections`` open connections -> 503 for the new one, closed at once;
- a request that is not valid HTTP -> 400 (uvicorn's own answer had no request id);
- a request body that pauses longer than ``body_timeout_seconds`` between two reads (nginx's client_body_timeout), or
  that after its first ``body_timeout_seconds`` arrives slower on average than ``body_min_rate_bytes`` per second
  (Apache's mod_reqtimeout MinRate) -> 408 ``body_timeout`` under the request's own id; the app's ``receive()`` then
  says ``http.disconnect``, so its handler ends and frees its slots, and the access line records 408. The clock runs
  only while the server reads (not while uvicorn's flow control holds the body back or a 100-continue is pending).
  When the answer has already started (e.g. a 401 sent without reading the body), the connection is just closed.

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
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.requestContext import getMeta
from settings.sections import ServerSettings

logger = logging.getLogger("poweron.connections")
BODY_TIMEOUT_CODE = "body_timeout"
MIN_BODY_CHECK_SECONDS = 0.05


class ReadClock(FlowControl):
    """uvicorn's flow control that also keeps the time reading was paused by the server (the app not taking the body
    yet, a pipelined request waiting): a body's clock must run only while the server reads."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport)
        self.loop = loop
        self.pausedTotal = 0.0
        self.pausedSince: float | None = None

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.pausedSince = self.loop.time()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.pausedSince is not None:
            self.pausedTotal += self.loop.time() - self.pausedSince
            self.pausedSince = None
        super().resume_reading()

    def readingTime(self) -> float:
        """The loop's clock minus the time reading was paused."""
        now = self.loop.time()
        return now - self.pausedTotal - (now - self.pausedSince if self.pausedSince is not None else 0.0)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head-size, head-time and connection-count limits (``limits`` is set on the
    subclass ``protocolFor`` makes)."""

    limits: ServerSettings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = ReadClock(transport, self.loop)
        self.timeout_keep_alive = self.limits.keep_alive_seconds  # also under `uvicorn app:app --http ...`
        self.refused = self.bodyPending = False
        self.headerTimer: asyncio.TimerHandle | None = None
        self.bodyTimer: asyncio.TimerHandle | None = None
        self._startHead()
        if len(self.connections) > self.limits.max_connections:
            self.refuse(503, "too_many_connections", f"The server has {self.limits.max_connections} connections "
                        "open ([server] max_connections); retry shortly", retryAfter=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stopHeaderTimer()
        self._stopBodyTimer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.inHead:
            self.headBytes += len(data)
        super().data_received(data)
        if self.inHead and not self.refused and self.headBytes > self.limits.max_header_bytes:
            self._headersTooLarge()
        if self.bodyPending and self.bodyTimer is None and not self.refused:
            self.bodyTimer = self.loop.call_later(self.limits.body_timeout_seconds, self._bodyCheck)

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
        self.bodyPending, self.bodyBytes = True, 0  # the timer is armed after this read, if the body is not complete
        self.bodyStart = self.bodyLastRead = self.flow.readingTime()  # type: ignore[attr-defined]

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            self.bodyBytes += len(body)
            self.bodyLastRead = self.flow.readingTime()  # type: ignore[attr-defined]
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.bodyPending = False
        self._stopBodyTimer()
        if not self.refused:
            super().on_message_complete()

    def _stopBodyTimer(self) -> None:
        if getattr(self, "bodyTimer", None) is not None:
            self.bodyTimer.cancel()  # type: ignore[union-attr]
            self.bodyTimer = None

    def _bodyTimeLeft(self) -> tuple[float, str]:
        """Reading time left before the body is late, and which limit ends first ("idle" or "rate")."""
        now, limits = self.flow.readingTime(), self.limits  # type: ignore[attr-defined]
        if self.cycle is not None and self.cycle.waiting_for_100_continue:  # the client waits for our go-ahead
            self.bodyStart = self.bodyLastRead = now
        idleLeft = self.bodyLastRead + limits.body_timeout_seconds - now
        if limits.body_min_rate_bytes:
            rateLeft = self.bodyStart + limits.body_timeout_seconds + self.bodyBytes / limits.body_min_rate_bytes - now
            if rateLeft < idleLeft:
                return rateLeft, "rate"
        return idleLeft, "idle"

    def _bodyCheck(self) -> None:
        """Runs when the body may be late (armed lazily: one timer per body, re-armed only when it fires)."""
        self.bodyTimer = None
        if self.refused or not self.bodyPending or self.transport.is_closing():
            return
        left, reason = self._bodyTimeLeft()
        if left > 0:
            self.bodyTimer = self.loop.call_later(max(left, MIN_BODY_CHECK_SECONDS), self._bodyCheck)
            return
        self._bodyTooSlow(reason)

    def _bodyTooSlow(self, reason: str) -> None:
        limits, cycle = self.limits, self.cycle
        if reason == "idle":
            message = (f"No request body bytes arrived for {limits.body_timeout_seconds:g} s "
                       "([server] body_timeout_seconds)")
        else:
            elapsed = self.flow.readingTime() - self.bodyStart  # type: ignore[attr-defined]
            message = (f"The request body arrived slower than {limits.body_min_rate_bytes} bytes/s after its first "
                       f"{limits.body_timeout_seconds:g} s ([server] body_min_rate_bytes): {self.bodyBytes} bytes in "
                       f"{elapsed:.1f} s")
        if cycle is None or cycle.response_started:  # answered already (e.g. 401 without reading): just close
            logger.warning("connection closed: the rest of a request body was too slow (%s)", reason)
            self.refused = True
            self.transport.close()
            return
        meta = getMeta(cycle.scope)
        if meta is not None:
            meta.answeredBelow = (408, BODY_TIMEOUT_CODE)
        cycle.disconnected = True  # the app's own answer now goes nowhere, and its receive() says http.disconnect
        cycle.message_event.set()
        self.refuse(408, BODY_TIMEOUT_CODE, message, requestId=meta.requestId if meta is not None else None)

    def send_400_response(self, msg: str) -> None:  # noqa: N802 (uvicorn's name)
        """uvicorn's answer to a request it cannot parse, in our shape and with a request id."""
        self.refuse(400, "invalid_http_request", "The request is not valid HTTP/1.1")

    def refuse(self, status: int, code: str, message: str, retryAfter: bool = False,
               requestId: str | None = None) -> None:
        """Answer ``status`` with our error shape and the request's id (a fresh one before routing), close the
        connection, parse no more."""
        self.refused = True
        self._stopHeaderTimer()
        self._stopBodyTimer()
        if self.transport.is_closing():
            return
        stage = "before routing" if requestId is None else "while reading the body"
        requestId = requestId or uuid.uuid4().hex
        logger.warning("connection refused %s: %s %s (request %s)", stage, status, code, requestId)
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
