"""Client disconnects: cancel upstream work (and so the GPU's generation) the moment the caller goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.requestContext import getMeta
from core.turns import takeTurn

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


class RelayResponse(Response):
    """Streams frames (an async iterator of bytes) to the client as they come, one ``http.response.body`` each.

    - The client leaving cancels the relay at its next await (one small watcher task, as in ``untilDisconnect``,
      instead of Starlette's task group per stream); the frame generator is always closed, shielded, so the
      upstream request ends with it.
    - Fair to the other requests on the loop: when frames arrive in a burst (a whole answer in one read), sending
      them never yields, so one stream could hold the loop for milliseconds. After ``SLICE_SECONDS`` of relaying
      without a turn the relay takes its next one (core/turns.py), so one loop iteration stays short at any
      number of streams and every stream moves on at the same pace.
    """

    SLICE_SECONDS = 0.0002

    def __init__(self, frames: AsyncIterator[bytes], status_code: int = 200,
                 headers: Mapping[str, str] | None = None, media_type: str | None = None) -> None:
        self.frames = frames
        self.status_code = status_code
        self.media_type = media_type or self.media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = DisconnectWatch(receive)
        try:
            await self._relay(scope, send, watch)
        except asyncio.CancelledError:
            if not (watch.gone and watch.handler is not None and watch.handler.uncancel() == 0):
                raise
        except OSError:
            raise ClientDisconnect() from None
        finally:
            watch.stop()
            with anyio.CancelScope(shield=True):
                await self.frames.aclose()  # type: ignore[attr-defined]

    async def _relay(self, scope: Scope, send: Send, watch: DisconnectWatch) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        perfCounter, sliceSeconds = time.perf_counter, self.SLICE_SECONDS
        turnTaken = perfCounter()
        async for frame in self.frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
            if perfCounter() - turnTaken > sliceSeconds:
                await takeTurn(scope)
                turnTaken = perfCounter()
        watch.stop()  # the end of the response reports http.disconnect to the watcher: not a client leaving
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class UpstreamSseResponse(RelayResponse):
    """The SSE relay of /v1 chat streams and transcription streams."""

    media_type = "text/event-stream"
