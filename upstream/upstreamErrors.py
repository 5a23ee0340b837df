"""The one place upstream failures map to the service's errors: Ollama's (or whisper's) status codes, transport
failures and mid-stream error lines become UpstreamError (503 unreachable/busy, 404 model, 504 timeout, 502 anything
else), in our words; the upstream's own text goes to the log only."""

from __future__ import annotations

import logging
import re

import httpx
import orjson

from core.errors import ServiceError

BUSY_RETRY_AFTER_SECONDS = 2
OLLAMA = "Ollama"
KNOWN_OLLAMA_ERRORS = (  # (pattern in Ollama's text, our words); Ollama's own text goes to the log only
    (re.compile(r"does not support tools", re.I), "does not support tools; send the request without `tools`"),
    (re.compile(r"does not support thinking", re.I), "cannot think; leave out reasoning_effort / think"),
    (re.compile(r"does not support (insert|generate|chat|completion)", re.I), "cannot generate text"),
    (re.compile(r"does not support (embed|embedding)", re.I), "cannot compute embeddings"),
    (re.compile(r"context (length|window)|input length|too long", re.I),
     "got an input longer than its context window; send less text"),
    (re.compile(r"image", re.I), "could not read an image of the request; send PNG, JPEG or WebP"),
    (re.compile(r"format|schema|grammar", re.I), "could not use the requested response format or schema"),
    (re.compile(r"memory|cuda|gpu|vram", re.I), "could not be loaded (not enough memory on the server)"),
)
logger = logging.getLogger("poweron.upstream")


class UpstreamError(ServiceError):
    """Ollama (or the whisper service) failed or could not be reached."""


def _errorMessageOf(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace").strip()[:300]
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return parsed["error"]
    return ""


def ourWords(raw: str, service: str) -> str | None:
    """What an upstream error means in our own words: Ollama's text can name blob paths and internal model names,
    so it goes to the log only; the whisper service is ours and its messages are written for callers."""
    if service != OLLAMA:
        return raw
    if raw:
        logger.warning("ollama said: %s", raw[:1000])
    return next((words for pattern, words in KNOWN_OLLAMA_ERRORS if pattern.search(raw)), None)


def mapTransportError(exc: httpx.HTTPError, baseUrl: str, service: str = OLLAMA) -> UpstreamError:
    """Connection refused -> 503, timeouts -> 504, a broken connection -> 502. ``baseUrl`` is internal: it is never
    part of the message (nor of the log)."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamError(503, f"{service} is not reachable", code="upstream_unavailable",
                             headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamError(503, f"Too many requests waiting for {service}; retry shortly", code="upstream_busy",
                             headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(504, f"{service} did not answer in time", code="upstream_timeout")
    return UpstreamError(502, f"{service} closed the connection unexpectedly ({type(exc).__name__})",
                         code="upstream_error")


def mapStatusError(status: int, body: bytes, externalName: str | None, service: str = OLLAMA) -> UpstreamError:
    """Translate an upstream error status and body into a ServiceError a caller can act on."""
    words = ourWords(_errorMessageOf(body), service)
    modelText = f"`{externalName}`" if externalName else "the requested model"
    if status == 404:
        return UpstreamError(404, f"The model {modelText} is not available in {service} (not pulled?)",
                             code="model_not_found", param="model")
    if status == 503:
        return UpstreamError(503, f"{service} is busy ({words or 'server busy'}); retry shortly",
                             code="upstream_busy", headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})
    if status == 400 and "context length" in (raw := _errorMessageOf(body).lower()) and "exceed" in raw:
        return UpstreamError(400, f"The input does not fit the context window of {modelText} ({service} refused "
                             "it rather than cut it); shorten it", code="context_length_exceeded")
    if status in (400, 422):
        if words and service == OLLAMA:
            return UpstreamError(400, f"{service} rejected the request: the model {modelText} {words}",
                                 code="upstream_rejected")
        return UpstreamError(400, f"{service} rejected the request for {modelText}: "
                             f"{words or 'the log tells why under the request id'}", code="upstream_rejected")
    if status == 403 and not body:
        return UpstreamError(502, f"{service} refused the request (Host check); check its base_url",
                             code="upstream_error")
    if service != OLLAMA:
        return UpstreamError(502, f"{service} failed with status {status}: {words or 'no message'}",
                             code="upstream_error")
    return UpstreamError(502, f"{service} failed with status {status} for {modelText}: "
                         f"{words or 'the log tells why under the request id'}",
                         code="upstream_error")


def midStreamError(message: str) -> UpstreamError:
    words = ourWords(message, OLLAMA)
    return UpstreamError(502, f"Ollama failed while generating{': the model ' + words if words else ''}",
                         code="upstream_stream_error")
