"""Client disconnects: cancel upstream work (and so the GPU's generation) the moment the caller goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from core.requestContext import getMeta

CLIENT_CLOSED_STATUS = 499
"""Status recorded (nginx's convention) when the client closed the connection before the answer."""
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


class DisconnectWatch:
    """Cancels the handler's task when the client disconnects (one small task instead of racing two)."""

    __slots__ = ("gone", "handler", "watcher")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self.handler = asyncio.current_task()
        self.watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the receive channel failed: nothing left to watch
            return
        if self.handler is not None:
            self.gone = True
            self.handler.cancel()

    def stop(self) -> None:
        """The work is over. The watcher is not cancelled: it ends by itself when the response is complete (the
        server then reports ``http.disconnect``). Cancelling it left a CancelledError-traceback-frame cycle per
        request (about 40 objects) for the cyclic GC, whose full collections then paused the loop for 100 ms+."""
        self.handler = None


async def untilDisconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client goes away first; then cancel it (closing the upstream request)."""
    watch = DisconnectWatch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.gone and watch.handler is not None and watch.handler.uncancel() == 0:
            raise ClientDisconnected from None
        raise
    finally:
        watch.stop()


async def clientGoneResponse(request: Request, exc: Exception) -> Response:
    """Exception handler for Starlette's ClientDisconnect (the client left while its body was being read, e.g.
    mid-upload): status 499 for the access log and metrics, no traceback; the response goes nowhere."""
    meta = getMeta(request)
    if meta is not None:
        meta.errorCode = "client_disconnected"
    return Response(status_code=CLIENT_CLOSED_STATUS)


def installDisconnectHandler(app: Starlette) -> None:
    """Register clientGoneResponse (without it a client leaving mid-upload is a 500 with a logged traceback)."""
    app.add_exception_handler(ClientDisconnect, clientGoneResponse)


class UpstreamSseResponse(StreamingResponse):
    """SSE relay that always closes its frame generator (and with it the upstream request) when it ends,
    including when the client disconnects and Starlette cancels the send loop."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
