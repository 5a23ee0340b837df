"""Per-request metadata (request id, key name, model, timings, token counts) and the middleware that carries it.

Route handlers fill in the fields they know; observers (access log, metrics) read them once the response is
complete, including the end of a stream. Content (prompts, files, answers) never goes in here.
"""

from __future__ import annotations

import logging
import re
import string
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.turns import TURNS_SCOPE_KEY, TurnGate, takeTurn

META_SCOPE_KEY = "poweron.meta"
PARAMETER = re.compile(r"\{[^}/]+\}")
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_.")
"""An incoming X-Request-ID made of anything else (Latin-1 letters included) is replaced by a fresh id."""
INTERNAL_ERROR_CODE = "internal_error"
logger = logging.getLogger("poweron.request")


@dataclass(slots=True)
class RequestMeta:
    """What is known about one request; metadata only, never content or keys."""

    requestId: str
    method: str
    path: str
    startTime: float = field(default_factory=time.perf_counter)
    keyName: str | None = None
    keyClass: str | None = None
    externalModel: str | None = None
    upstream: str | None = None
    """Name of the Ollama upstream that served the request (never its URL)."""
    failedOver: str | None = None
    """Name of the upstream that failed before the request was retried on ``upstream``."""
    status: int | None = None
    upstreamSeconds: float | None = None
    ttftSeconds: float | None = None
    queueSeconds: float | None = None
    """Time spent waiting for Ollama slots (admission control), summed over the request's model calls."""
    promptTokens: int | None = None
    completionTokens: int | None = None
    errorCode: str | None = None
    streamed: bool = False
    rateLimited: bool = False
    durationSeconds: float | None = None
    route: str | None = None
    """Matched route template (``/v1/models/{modelId}``), set when the response is complete; None if none matched."""
    responseHeaders: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Extra raw headers added to the response when it starts (e.g. X-RateLimit-*)."""
    finishCallbacks: list[Callable[[], None]] = field(default_factory=list)
    """Run when the response is complete (end of a stream included), before the observers; e.g. release a slot."""
    answeredBelow: tuple[int, str] | None = None
    """Status and error code the connection guard already answered (408 for a body too slow): the access line
    records these, whatever the app then answered into the closed connection."""


RequestObserver = Callable[[RequestMeta], None]
ErrorRenderer = Callable[[Scope, Receive, Send], Awaitable[None]]
"""Sends the 500 answer for an exception that escaped the app before its response started."""


def getMeta(request: Any) -> RequestMeta | None:
    """The RequestMeta of a Starlette request or an ASGI scope."""
    scope = request if isinstance(request, dict) else request.scope
    return scope.get(META_SCOPE_KEY)


def _incomingRequestId(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            candidate = value.decode("latin-1")[:64]
            if candidate and all(c in REQUEST_ID_CHARACTERS for c in candidate):
                return candidate
    return uuid.uuid4().hex


def _templatePattern(template: str) -> re.Pattern[str]:
    """``/v1/models/{modelId}`` -> a regular expression matching its concrete paths."""
    parts = PARAMETER.split(template)
    return re.compile("^" + "[^/]+".join(re.escape(part) for part in parts) + "$")


def _routePatterns(app: Any) -> tuple[tuple[re.Pattern[str], str], ...]:
    """The app's route templates as regular expressions, built once from its OpenAPI paths."""
    patterns = getattr(app.state, "routePatterns", None)
    if patterns is None:
        patterns = tuple((_templatePattern(path), path) for path in app.openapi().get("paths", {}))
        app.state.routePatterns = patterns
    return patterns


def _routeTemplateOf(scope: Scope) -> str | None:
    """The template of the route a request refused before routing (401 key gate, 413 body limit) was meant for."""
    app = scope.get("app")
    if app is None or not hasattr(app, "openapi"):
        return None
    return next((template for pattern, template in _routePatterns(app) if pattern.match(scope["path"])), None)


class RequestContextMiddleware:
    """Pure ASGI middleware: creates RequestMeta, returns X-Request-ID, notifies observers at the end.

    An exception that escapes the app is answered here (500 with the request id, via ``renderError``) and logged
    with the request id, so every response carries X-Request-ID and every 5xx access line an error code."""

    def __init__(self, app: ASGIApp, observers: list[RequestObserver],
                 renderError: ErrorRenderer | None = None, turns: TurnGate | None = None) -> None:
        self.app = app
        self.observers = observers
        self.renderError = renderError
        self.turns = turns
        """The loop's turn gate (core/turns.py): a request takes its first turn here, before any of its work."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        meta = RequestMeta(requestId=_incomingRequestId(scope), method=scope["method"], path=scope["path"])
        scope[META_SCOPE_KEY] = meta
        requestIdHeader = (REQUEST_ID_HEADER, meta.requestId.encode())

        async def sendWithId(message: Message) -> None:
            if message["type"] == "http.response.start":
                meta.status = message["status"]
                message["headers"] = [*message.get("headers", ()), requestIdHeader, *meta.responseHeaders]
            await send(message)

        turns = self.turns
        try:
            if turns is not None:
                scope[TURNS_SCOPE_KEY] = turns
                turns.requests += 1
                await takeTurn(scope)
            await self.app(scope, receive, sendWithId)
        except Exception:
            if not await self._answerUnexpected(meta, scope, receive, sendWithId):
                raise
        except BaseException:
            meta.status = meta.status or 500
            raise
        finally:
            if turns is not None:
                turns.requests -= 1
            meta.durationSeconds = time.perf_counter() - meta.startTime
            meta.route = getattr(scope.get("route"), "path_format", None) or _routeTemplateOf(scope)
            if meta.answeredBelow is not None:
                meta.status, meta.errorCode = meta.answeredBelow
            if meta.status is not None and meta.status >= 500 and not meta.errorCode:
                meta.errorCode = f"status_{meta.status}"
            self._finish(meta)
            self._notify(meta)

    async def _answerUnexpected(self, meta: RequestMeta, scope: Scope, receive: Receive, send: Send) -> bool:
        """Log the exception with the request id and answer 500; False when the response has started already (the
        caller re-raises: the server cuts the connection, the only way left to tell the client)."""
        logger.exception("unexpected error (request %s)", meta.requestId)
        meta.errorCode = meta.errorCode or INTERNAL_ERROR_CODE
        if meta.status is not None or self.renderError is None:
            meta.status = meta.status or 500
            return False
        await self.renderError(scope, receive, send)
        return True

    @staticmethod
    def _finish(meta: RequestMeta) -> None:
        for callback in meta.finishCallbacks:
            try:
                callback()
            except Exception:  # a callback must never break a response
                logger.exception("request finish callback failed")

    def _notify(self, meta: RequestMeta) -> None:
        for observer in self.observers:
            try:
                observer(meta)
            except Exception:  # an observer must never break a response
                logger.exception("request observer failed")
