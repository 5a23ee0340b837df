"""The main service's /v1/audio routes: OpenAI's multipart upload streams through to the whisper service unparsed
(the original Content-Type and boundary kept), and its answer (JSON, text or SSE events) streams back.

The whisper service validates the form fields (``model`` included, through config.resolveModel); this side checks
the key (router dependency), that poweron-transcribe is available (whisper's health check), and the upload size.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Message

from config import Settings
from core.clientDisconnect import CLIENT_CLOSED_STATUS, ClientDisconnected, UpstreamSseResponse, untilDisconnect
from core.errors import ServiceError, openAiErrorBody
from core.requestContext import RequestMeta, getMeta
from speech import wireSchemas
from upstream.dependencies import RegistryDep
from upstream.ollamaClient import UpstreamError, mapStatusError, mapTransportError

router = APIRouter(prefix="/v1/audio", tags=["audio"])

STT_MODEL = "poweron-transcribe"
SERVICE_NAME = "The speech-to-text service"
FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for the multipart framing and the text fields on top of the largest file (as in whisperService)."""
MODEL_HEADER = "x-poweron-model"
PASSED_HEADERS = ("content-type", "retry-after", "cache-control")
PASSED_ERROR_STATUSES = frozenset({400, 404, 413, 415, 501, 503})
"""Whisper's own errors (already OpenAI envelopes) that go to the client unchanged."""
STREAM_END_TYPE = "transcript.text.done"
NOT_JSON_ANSWER = f"{SERVICE_NAME} sent an answer that is not JSON"
NOT_JSON_EVENT = f"{SERVICE_NAME} sent an event that is not JSON"
TRUNCATED_STREAM_MESSAGE = f"{SERVICE_NAME}'s stream ended before it was complete (no {STREAM_END_TYPE} event)"


def uploadLimit(settings: Settings) -> int:
    return settings.whisper.max_upload_bytes + FORM_OVERHEAD_BYTES


def uploadTooLarge(settings: Settings) -> ServiceError:
    return ServiceError(413, f"The audio file is larger than the limit of "
                        f"{settings.whisper.max_upload_bytes / 1048576:.0f} MiB; "
                        "split or compress it (e.g. mp3 or ogg)",
                        param="file", code="file_too_large")


def checkUpload(request: Request, settings: Settings) -> None:
    """Multipart only, and a declared length within the limit (refused before a byte is read)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ServiceError(400, "Send the audio as multipart/form-data with the fields file and model",
                           code="invalid_content_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > uploadLimit(settings):
        raise uploadTooLarge(settings)


async def limitedBody(request: Request, settings: Settings, uploaded: asyncio.Event) -> AsyncIterator[bytes]:
    """The request body as it arrives, stopped with 413 past the limit (chunked or lying clients too); sets
    ``uploaded`` once the whole body has been read."""
    received, limit = 0, uploadLimit(settings)
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise uploadTooLarge(settings)
        if chunk:
            yield chunk
    uploaded.set()


class AfterUpload:
    """The request's receive channel for a disconnect watch that begins once the upload has been read: until then
    the body stream reads the channel (and notices a client that leaves during the upload itself)."""

    def __init__(self, request: Request, uploaded: asyncio.Event) -> None:
        self.request = request
        self.uploaded = uploaded

    async def receive(self) -> Message:
        await self.uploaded.wait()
        return await self.request.receive()


def forwardedHeaders(request: Request, meta: RequestMeta | None) -> dict[str, str]:
    """Only what whisper needs: the multipart type with its boundary, the length, the request id. Never the key."""
    headers = {"content-type": request.headers["content-type"]}
    if length := request.headers.get("content-length"):
        headers["content-length"] = length
    if meta is not None:
        headers["x-request-id"] = meta.requestId
    return headers


async def sendToWhisper(request: Request, settings: Settings, baseUrl: str, endpoint: str) -> httpx.Response:
    """POST the streamed body to whisper and wait for its answer; transport failures map to 503/504/502. A client
    that leaves (during the upload or while whisper works) closes the upstream request at once: ClientDisconnected.
    """
    http: httpx.AsyncClient = request.app.state.http
    timeout = httpx.Timeout(connect=settings.ollama.connect_timeout, read=settings.whisper.request_timeout,
                            write=60.0, pool=settings.ollama.connect_timeout + 5)
    uploaded = asyncio.Event()
    upstream = http.build_request("POST", f"{baseUrl}/v1/audio/{endpoint}",
                                  content=limitedBody(request, settings, uploaded),
                                  headers=forwardedHeaders(request, getMeta(request)), timeout=timeout)
    try:
        return await untilDisconnect(AfterUpload(request, uploaded), http.send(upstream, stream=True))
    except httpx.HTTPError as exc:
        raise mapTransportError(exc, baseUrl, service=SERVICE_NAME) from None
    except ClientDisconnect:
        raise ClientDisconnected from None
    finally:
        uploaded.set()  # after a failed upload the watch reads the channel until the response is complete


def parsedJson(body: bytes) -> tuple[bool, Any]:
    """(True, value) for a JSON body, (False, None) otherwise."""
    try:
        return True, orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, None


def envelopeMessage(body: bytes) -> str | None:
    """The message of an OpenAI error envelope (whisper's error shape), or None for any other body."""
    isJson, parsed = parsedJson(body)
    if isJson and isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        message = parsed["error"].get("message")
        return message if isinstance(message, str) else ""
    return None


def splitEvents(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete SSE events in ``buffer`` (each with its blank line) and the incomplete rest."""
    *complete, rest = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
    return [event + b"\n\n" for event in complete if event.strip()], rest


def eventPayload(event: bytes) -> Any:
    """The JSON of an event's data lines (None for an event without data); UpstreamError when it is not JSON."""
    data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
    if not data:
        return None
    isJson, parsed = parsedJson(data)
    if not isJson:
        raise UpstreamError(502, NOT_JSON_EVENT, code="upstream_error")
    return parsed


def endsTheStream(payload: Any) -> bool:
    return isinstance(payload, dict) and (payload.get("type") == STREAM_END_TYPE or "error" in payload)


def errorEvent(error: ServiceError, meta: RequestMeta | None) -> bytes:
    if meta is not None:
        meta.errorCode = error.code or error.errorType
    return b"data: " + orjson.dumps(openAiErrorBody(error)) + b"\n\n"


async def relayEvents(response: httpx.Response, baseUrl: str, meta: RequestMeta | None,
                      started: float) -> AsyncIterator[bytes]:
    """Whisper's SSE events as they come, each checked (JSON) and passed whole. A stream that breaks, stalls past
    request_timeout, sends an event that is not JSON or ends without ``transcript.text.done`` (or whisper's own
    error event) ends with an error event."""
    pending = b""
    try:
        async for chunk in response.aiter_raw():
            events, pending = splitEvents(pending + chunk)
            for event in events:
                payload = eventPayload(event)
                yield event
                if endsTheStream(payload):
                    if "error" in payload and meta is not None:
                        meta.errorCode = "upstream_stream_error"
                    return
        yield errorEvent(UpstreamError(502, TRUNCATED_STREAM_MESSAGE, code="upstream_stream_error"), meta)
    except httpx.HTTPError as exc:
        yield errorEvent(mapTransportError(exc, baseUrl, service=SERVICE_NAME), meta)
    except ServiceError as exc:
        yield errorEvent(exc, meta)
    finally:
        await response.aclose()
        if meta is not None:
            meta.upstreamSeconds = time.perf_counter() - started


async def relayResponse(response: httpx.Response, baseUrl: str, meta: RequestMeta | None,
                        started: float) -> Response:
    """Pass whisper's answer through: SSE streamed, everything else read whole (it is small)."""
    headers = {name: response.headers[name] for name in PASSED_HEADERS if name in response.headers}
    if meta is not None and MODEL_HEADER in response.headers:
        meta.externalModel = response.headers[MODEL_HEADER]
    if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        if meta is not None:
            meta.streamed = True
        return UpstreamSseResponse(relayEvents(response, baseUrl, meta, started), headers=headers)
    try:
        body = await response.aread()
    except httpx.HTTPError as exc:
        raise mapTransportError(exc, baseUrl, service=SERVICE_NAME) from None
    finally:
        await response.aclose()
        if meta is not None:
            meta.upstreamSeconds = time.perf_counter() - started
    if response.status_code == 200:
        if headers.get("content-type", "").startswith("application/json") and not parsedJson(body)[0]:
            raise UpstreamError(502, NOT_JSON_ANSWER, code="upstream_error")
        return Response(body, status_code=200, headers=headers)
    message = envelopeMessage(body)
    if response.status_code in PASSED_ERROR_STATUSES and message is not None:
        return Response(body, status_code=response.status_code, headers=headers)
    upstreamBody = orjson.dumps({"error": message}) if message else body  # mapStatusError reads Ollama's shape
    raise mapStatusError(response.status_code, upstreamBody, STT_MODEL, service=SERVICE_NAME)


async def forwardAudio(request: Request, registry: RegistryDep, endpoint: str) -> Response:
    """Availability and size checks, then the streamed round trip to whisper."""
    settings = registry.settings
    if not settings.whisper.enabled:
        raise ServiceError(404, "Speech-to-text is switched off on this server ([whisper] enabled = false)",
                           code="model_not_found", param="model")
    checkUpload(request, settings)
    await registry.resolve(STT_MODEL)
    baseUrl = settings.whisper.base_url.rstrip("/")
    started = time.perf_counter()
    meta = getMeta(request)
    try:
        response = await sendToWhisper(request, settings, baseUrl, endpoint)
    except ClientDisconnected:
        if meta is not None:
            meta.errorCode = "client_disconnected"
        return Response(status_code=CLIENT_CLOSED_STATUS)
    return await relayResponse(response, baseUrl, meta, started)


@router.post("/transcriptions", **wireSchemas.audioDoc("transcribe"))
async def createTranscription(request: Request, registry: RegistryDep) -> Response:
    """Transcribe audio with poweron-transcribe (whisper-1 accepted) on the local whisper service."""
    return await forwardAudio(request, registry, "transcriptions")


@router.post("/translations", **wireSchemas.audioDoc("translate"))
async def createTranslation(request: Request, registry: RegistryDep) -> Response:
    """Translate audio into English text with poweron-transcribe on the local whisper service."""
    return await forwardAudio(request, registry, "translations")
