"""Request limits: the body-size middleware (Content-Length checked before reading, bytes counted while reading) and
the checks route handlers call for upload sizes, image pixels and image URLs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import Settings
from core.errors import ServiceError, errorResponse

CONTENT_LENGTH = b"content-length"
CONNECTION_CLOSE = (b"connection", b"close")
LINGER_FACTOR = 2
"""A declared body up to this many times the limit is refused with the connection kept open: the server discards the
rest of the upload as it arrives, so a client still sending reads the 413 instead of a connection reset (closing a
socket with unread bytes resets it; nginx's lingering close solves the same). Larger bodies get Connection: close."""


def describeBytes(size: int) -> str:
    """A byte count as people read it: ``25 MiB (26214400 bytes)``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.4g} {unit} ({size} bytes)"
    return f"{size} bytes"


def bodyTooLargeMessage(maxBytes: int) -> str:
    return (f"Request body too large: the limit is {describeBytes(maxBytes)} ([limits] max_body_bytes). "
            "Send fewer or smaller files per request.")


class BodyTooLargeError(StarletteHTTPException):
    """Raised by the counting receive once the body passes the limit (FastAPI re-raises HTTPExceptions as-is)."""

    def __init__(self, maxBytes: int) -> None:
        super().__init__(413, bodyTooLargeMessage(maxBytes), headers={"Connection": "close"})


def _declaredLength(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == CONTENT_LENGTH:
            return int(value)
    return None


class BodyLimitMiddleware:
    """Pure ASGI: 413 for a Content-Length over the limit without reading the body; otherwise counts the bytes as
    the app reads them and stops at the limit (413), so no client, chunked or lying, gets more than that buffered."""

    def __init__(self, app: ASGIApp, maxBytes: int) -> None:
        self.app = app
        self.maxBytes = maxBytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = _declaredLength(scope)
        except ValueError:
            await _refuse(scope, receive, send, ServiceError(400, "Content-Length is not a whole number",
                                                             code="invalid_content_length"))
            return
        if declared is not None and declared > self.maxBytes:
            linger = declared <= LINGER_FACTOR * self.maxBytes
            await _refuse(scope, receive, send, _tooLarge(self.maxBytes, close=not linger))
            return
        await self._countingBody(scope, receive, send)

    async def _countingBody(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        exceeded = started = False

        async def countingReceive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLargeError(self.maxBytes)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.maxBytes:
                exceeded = True
                raise BodyTooLargeError(self.maxBytes)
            return message

        async def trackingSend(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, countingReceive, trackingSend)
        except BodyTooLargeError:
            if started:
                raise
            await _refuse(scope, receive, send, _tooLarge(self.maxBytes))


def _tooLarge(maxBytes: int, close: bool = True) -> ServiceError:
    return ServiceError(413, bodyTooLargeMessage(maxBytes), code="request_too_large",
                        headers={"Connection": "close"} if close else None)


async def _refuse(scope: Scope, receive: Receive, send: Send, error: ServiceError) -> None:
    await errorResponse(Request(scope, receive), error)(scope, receive, send)


def checkFileSize(size: int, settings: Settings, name: str | None = None, param: str | None = None) -> None:
    """413 when one uploaded file is larger than [limits] max_file_bytes."""
    limit = settings.limits.max_file_bytes
    if size > limit:
        what = f"File '{name}'" if name else "An uploaded file"
        raise ServiceError(413, f"{what} is {describeBytes(size)}; the limit per file is {describeBytes(limit)} "
                           "([limits] max_file_bytes)", code="file_too_large", param=param)


def checkImagePixels(width: int, height: int, settings: Settings, param: str | None = None) -> None:
    """413 when an image has more pixels than [limits] max_image_pixels; call it before decoding the pixels."""
    limit = settings.limits.max_image_pixels
    if width * height > limit:
        raise ServiceError(413, f"Image is {width}x{height} = {width * height:,} pixels; the limit is {limit:,} pixels "
                           "([limits] max_image_pixels)", code="image_too_large", param=param)


class PixelBudget:
    """The image pixels one request may still spend ([limits] max_request_pixels), counted from image headers."""

    __slots__ = ("limit", "spent")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0

    def spend(self, pixels: int, param: str | None = None) -> None:
        self.spent += pixels
        if self.spent > self.limit:
            raise ServiceError(413, f"The images of this request have more than {self.limit:,} pixels together "
                               "([limits] max_request_pixels); send fewer or smaller images per request",
                               code="request_pixels_too_large", param=param)


def _countOf(body: dict, field: str) -> int:
    value = body.get(field)
    return len(value) if isinstance(value, list) else 0


def checkChatBudget(body: dict, settings: Settings) -> None:
    """413 when a chat body has more messages (or Responses ``input`` items) or tools than [limits] allows; checked
    right after parsing, before any per-message work."""
    limits = settings.limits
    messages = max(_countOf(body, "messages"), _countOf(body, "input"))
    if messages > limits.max_messages:
        raise ServiceError(413, f"The request has {messages:,} messages; the limit is {limits.max_messages:,} "
                           "([limits] max_messages)", code="too_many_messages", param="messages")
    tools = _countOf(body, "tools")
    if tools > limits.max_tools:
        raise ServiceError(413, f"The request has {tools:,} tools; the limit is {limits.max_tools:,} "
                           "([limits] max_tools)", code="too_many_tools", param="tools")


def rejectRemoteImageUrl(url: str, param: str | None = None) -> None:
    """400 unless ``url`` is a data: URL; the service never fetches remote (or file:) URLs."""
    scheme = urlsplit(url.strip()[:64]).scheme.lower()
    if scheme == "data":
        return
    if scheme in ("http", "https"):
        reason = f"this service never fetches {scheme} URLs, so documents and images stay on this server"
    else:
        reason = f"'{scheme}:' URLs are not accepted" if scheme else "no URL scheme was given"
    raise ServiceError(400, "image_url must be a data URL (data:image/png;base64,<base64 data>): " + reason,
                       code="remote_url_not_allowed", param=param)
