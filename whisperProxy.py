"""The main service's /v1/audio routes: OpenAI's multipart upload streams through to the whisper service unparsed
(the original Content-Type and boundary kept), and its answer (JSON, text or SSE events) streams back.

The whisper service validates the form fields (``model`` included, through config.resolveModel); this side checks
the key (router dependency), that poweron-transcribe is available (whisper's health check), and the upload size.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

import apiSchemas
from config import Settings
from dependencies import RegistryDep
from errors import ServiceError, openAiErrorBody
from ollamaClient import mapStatusError, mapTransportError
from requestContext import RequestMeta, getMeta

router = APIRouter(prefix="/v1/audio", tags=["audio"])

STT_MODEL = "poweron-transcribe"
SERVICE_NAME = "The speech-to-text service"
FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for the multipart framing and the text fields on top of the largest file (as in whisperService)."""
MODEL_HEADER = "x-poweron-model"
PASSED_HEADERS = ("content-type", "retry-after", "cache-control")
PASSED_ERROR_STATUSES = frozenset({400, 404, 413, 415, 501, 503})
"""Whisper's own errors (already OpenAI envelopes) that go to the client unchanged."""


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


async def limitedBody(request: Request, settings: Settings) -> AsyncIterator[bytes]:
    """The request body as it arrives, stopped with 413 past the limit (chunked or lying clients too)."""
    received, limit = 0, uploadLimit(settings)
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise uploadTooLarge(settings)
        if chunk:
            yield chunk


def forwardedHeaders(request: Request, meta: RequestMeta | None) -> dict[str, str]:
    """Only what whisper needs: the multipart type with its boundary, the length, the request id. Never the key."""
    headers = {"content-type": request.headers["content-type"]}
    if length := request.headers.get("content-length"):
        headers["content-length"] = length
    if meta is not None:
        headers["x-request-id"] = meta.requestId
    return headers


async def sendToWhisper(request: Request, settings: Settings, baseUrl: str, endpoint: str) -> httpx.Response:
    """POST the streamed body to whisper; transport failures map to 503/504/502."""
    http: httpx.AsyncClient = request.app.state.http
    timeout = httpx.Timeout(connect=settings.ollama.connect_timeout, read=settings.whisper.request_timeout,
                            write=60.0, pool=settings.ollama.connect_timeout + 5)
    upstream = http.build_request("POST", f"{baseUrl}/v1/audio/{endpoint}", content=limitedBody(request, settings),
                                  headers=forwardedHeaders(request, getMeta(request)), timeout=timeout)
    try:
        return await http.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        raise mapTransportError(exc, baseUrl, service=SERVICE_NAME) from None
    except ClientDisconnect:
        raise ServiceError(400, "The client closed the connection during the upload",
                           code="client_disconnected") from None


def isOpenAiEnvelope(body: bytes) -> bool:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


async def relayEvents(response: httpx.Response, baseUrl: str, meta: RequestMeta | None,
                      started: float) -> AsyncIterator[bytes]:
    """Whisper's SSE bytes as they come; a broken upstream ends the stream with an error event."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        error = mapTransportError(exc, baseUrl, service=SERVICE_NAME)
        yield b"data: " + orjson.dumps(openAiErrorBody(error)) + b"\n\n"
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
        return StreamingResponse(relayEvents(response, baseUrl, meta, started), headers=headers)
    try:
        body = await response.aread()
    except httpx.HTTPError as exc:
        raise mapTransportError(exc, baseUrl, service=SERVICE_NAME) from None
    finally:
        await response.aclose()
        if meta is not None:
            meta.upstreamSeconds = time.perf_counter() - started
    if response.status_code == 200 or (response.status_code in PASSED_ERROR_STATUSES and isOpenAiEnvelope(body)):
        return Response(body, status_code=response.status_code, headers=headers)
    raise mapStatusError(response.status_code, body, STT_MODEL, service=SERVICE_NAME)


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
    response = await sendToWhisper(request, settings, baseUrl, endpoint)
    return await relayResponse(response, baseUrl, getMeta(request), started)


@router.post("/transcriptions", **apiSchemas.audioDoc("transcribe"))
async def createTranscription(request: Request, registry: RegistryDep) -> Response:
    """Transcribe audio with poweron-transcribe (whisper-1 accepted) on the local whisper service."""
    return await forwardAudio(request, registry, "transcriptions")


@router.post("/translations", **apiSchemas.audioDoc("translate"))
async def createTranslation(request: Request, registry: RegistryDep) -> Response:
    """Translate audio into English text with poweron-transcribe on the local whisper service."""
    return await forwardAudio(request, registry, "translations")
