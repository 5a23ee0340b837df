"""The whisper service: faster-whisper behind OpenAI's audio API in its own process (own GPU memory, own restarts),
beside the main service the way Ollama is. It binds to localhost and needs no key: the main service forwards
authenticated /v1/audio requests to it. ``python -m whisperServer`` serves it on [whisper] host and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from config import ConfigError, Settings, loadSettings, resolveModel
from core.clientDisconnect import CLIENT_CLOSED_STATUS, ClientDisconnected, untilDisconnect
from core.errors import ServiceError, installErrorHandlers, openAiErrorBody
from core.nativeTelemetry import switchOffNativeTelemetry
from core.requestContext import RequestContextMiddleware, RequestMeta
from whisperServer.engine import ModelLoadError, TranscriptionJob, WhisperEngine
from whisperServer.languages import ENGLISH_ONLY, languageCode, languageName
from whisperServer.transcriptFormats import (
    MEDIA_TYPES,
    RESPONSE_FORMATS,
    Transcript,
    TranscriptSegment,
    renderTranscript,
)

logger = logging.getLogger("poweron.whisper")
router = APIRouter()

FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for the multipart framing and the text fields on top of the largest file."""
MAX_FORM_FIELDS = 32
MODEL_HEADER = "X-PowerOn-Model"
STREAMABLE_FORMATS = ("json", "text")
GRANULARITIES = ("segment", "word")


@dataclass(slots=True)
class AudioRequest:
    """The validated fields of one multipart audio request (OpenAI's names in the form)."""

    externalModel: str
    responseFormat: str
    stream: bool
    withWords: bool
    job: TranscriptionJob


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServiceError(400, f"`{name}` must be a text field, not a file", param=name, code="invalid_field")
    return value.strip()


def _checkModel(form: FormData, settings: Settings) -> str:
    name = _field(form, "model")
    if not name:
        raise ServiceError(400, "`model` is required: send poweron-transcribe (or whisper-1)", param="model",
                           code="missing_model")
    spec = resolveModel(settings, name)
    if spec is None:
        raise ServiceError(404, f"The model `{name}` does not exist; use poweron-transcribe (whisper-1 works too)",
                           param="model", code="model_not_found")
    if spec.backend != "whisper":
        raise ServiceError(400, f"The model `{name}` cannot transcribe audio; use poweron-transcribe",
                           param="model", code="model_not_stt")
    return spec.externalName


def _checkFile(form: FormData, maxBytes: int) -> UploadFile:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ServiceError(400, "`file` is required: send the recording as a multipart file part named file",
                           param="file", code="missing_file")
    size = upload.size if upload.size is not None else 0
    if size == 0:
        raise ServiceError(400, "The uploaded file is empty", param="file", code="empty_file")
    if size > maxBytes:
        raise uploadTooLarge(maxBytes)
    return upload


def uploadTooLarge(maxBytes: int) -> ServiceError:
    return ServiceError(413, f"The audio file is larger than the limit of {maxBytes / 1048576:.0f} MiB; "
                        "split or compress it (e.g. mp3 or ogg)", param="file", code="file_too_large")


def _responseFormat(form: FormData) -> str:
    value = (_field(form, "response_format") or "json").lower()
    if value == "diarized_json":
        raise ServiceError(400, "response_format diarized_json needs a diarization model; use one of "
                           f"{', '.join(RESPONSE_FORMATS)}", param="response_format", code="invalid_response_format")
    if value not in RESPONSE_FORMATS:
        raise ServiceError(400, f"response_format '{value[:40]}' is unknown; use one of {', '.join(RESPONSE_FORMATS)}",
                           param="response_format", code="invalid_response_format")
    return value


def _temperature(form: FormData) -> float:
    raw = _field(form, "temperature") or "0"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ServiceError(400, f"temperature must be a number from 0 to 1, not '{raw[:20]}'", param="temperature",
                           code="invalid_temperature")
    return value


def _flag(form: FormData, name: str) -> bool:
    raw = (_field(form, name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ServiceError(400, f"{name} must be true or false", param=name, code="invalid_field")
    return raw in ("true", "1")


def _language(form: FormData, supported: frozenset[str]) -> str | None:
    """The ISO-639-1 code (``de``; ``de-DE`` and ``german`` are understood too), or None to detect it. A code the
    model cannot transcribe is a 400: an English-only model would answer German speech with English words."""
    raw = _field(form, "language")
    if not raw:
        return None
    language = languageCode(raw)
    if not supported or language in supported:
        return language
    named = f"'{language[:20]}'" + (f" ({languageName(language)})" if language != languageName(language) else "")
    if supported == ENGLISH_ONLY:
        raise ServiceError(400, f"language {named} cannot be transcribed: the speech-to-text model is English-only; "
                           "send English audio, or leave language empty", param="language",
                           code="unsupported_language")
    listed = ", ".join(sorted(supported)) if len(supported) < 10 else f"{len(supported)} ISO-639-1 codes"
    raise ServiceError(400, f"language {named} is not supported by the model (supported: {listed})",
                       param="language", code="unsupported_language")


def _wantsWords(form: FormData, responseFormat: str) -> bool:
    """``timestamp_granularities[]`` comes as one part per value (openai-python's bracket names)."""
    values = [v.strip() for v in (*form.getlist("timestamp_granularities[]"), *form.getlist("timestamp_granularities"))
              if isinstance(v, str)]
    unknown = [v for v in values if v not in GRANULARITIES]
    if unknown:
        raise ServiceError(400, f"timestamp_granularities may contain segment and word, not '{unknown[0][:20]}'",
                           param="timestamp_granularities", code="invalid_granularity")
    if "word" in values and responseFormat != "verbose_json":
        raise ServiceError(400, "word timestamps need response_format verbose_json",
                           param="timestamp_granularities", code="invalid_granularity")
    return "word" in values


def parseAudioForm(form: FormData, task: str, settings: Settings, supported: frozenset[str]) -> AudioRequest:
    """Validate OpenAI's multipart fields; every problem is a 4xx naming the field."""
    externalModel = _checkModel(form, settings)
    upload = _checkFile(form, settings.whisper.max_upload_bytes)
    responseFormat = _responseFormat(form)
    stream = _flag(form, "stream")
    if stream and responseFormat not in STREAMABLE_FORMATS:
        raise ServiceError(400, "stream=true sends transcript.text events; use response_format json or text with it",
                           param="stream", code="invalid_stream")
    withWords = _wantsWords(form, responseFormat)
    job = TranscriptionJob(task=task, audio=upload.file, prompt=_field(form, "prompt"),
                           language=_language(form, supported) if task == "transcribe" else None,
                           temperature=_temperature(form), wordTimestamps=withWords)
    return AudioRequest(externalModel, responseFormat, stream, withWords, job)


async def readLimitedForm(request: Request, maxBytes: int) -> FormData:
    """Parse the multipart body, refusing it (413) as soon as more than ``maxBytes`` arrive."""
    contentType = request.headers.get("content-type", "")
    if not contentType.lower().startswith("multipart/form-data"):
        raise ServiceError(400, "Send the audio as multipart/form-data with the fields file and model",
                           code="invalid_content_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > maxBytes:
        raise uploadTooLarge(maxBytes - FORM_OVERHEAD_BYTES)
    received = 0

    async def countingReceive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > maxBytes:
            raise uploadTooLarge(maxBytes - FORM_OVERHEAD_BYTES)
        return message

    return await Request(request.scope, countingReceive).form(max_files=1, max_fields=MAX_FORM_FIELDS)


def sseEvent(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def doneEvent(transcript: Transcript) -> bytes:
    """The stream's last event: the whole text, and the language as verbose_json names it (a PowerOn extension of
    OpenAI's event, so a streaming client learns what was detected)."""
    return sseEvent({"type": "transcript.text.done", "text": transcript.text, "language": transcript.languageName})


async def transcriptEvents(first: TranscriptSegment | Transcript,
                           items: AsyncIterator[TranscriptSegment | Transcript],
                           form: FormData) -> AsyncIterator[bytes]:
    """``transcript.text.delta`` per segment, then ``transcript.text.done`` with the whole text (or an error)."""
    item, isFirstDelta = first, True
    try:
        while not isinstance(item, Transcript):
            delta = item.text.lstrip() if isFirstDelta else item.text
            isFirstDelta = False
            if delta:
                yield sseEvent({"type": "transcript.text.delta", "delta": delta})
            item = await anext(items)
        yield doneEvent(item)
    except ServiceError as exc:
        yield sseEvent(openAiErrorBody(exc))
    finally:
        await items.aclose()  # type: ignore[attr-defined]
        await form.close()


def renderResponse(transcript: Transcript, audio: AudioRequest) -> Response:
    body = renderTranscript(transcript, audio.responseFormat, audio.withWords)
    headers = {MODEL_HEADER: audio.externalModel}
    if isinstance(body, dict):
        return Response(orjson.dumps(body), media_type=MEDIA_TYPES[audio.responseFormat], headers=headers)
    return Response(body, media_type=MEDIA_TYPES[audio.responseFormat], headers=headers)


async def streamResponse(engine: WhisperEngine, audio: AudioRequest, form: FormData) -> StreamingResponse:
    """SSE events; an error before the first segment (bad audio, busy) is still a plain 4xx/5xx response."""
    items = engine.stream(audio.job)
    first = await anext(items)
    return StreamingResponse(transcriptEvents(first, items, form), media_type="text/event-stream",
                             headers={MODEL_HEADER: audio.externalModel, "Cache-Control": "no-cache"})


async def handleAudio(request: Request, task: str) -> Response:
    """Shared body of both routes: check capacity, read the upload, validate, transcribe in a worker thread."""
    settings: Settings = request.app.state.settings
    engine: WhisperEngine = request.app.state.engine
    if task == "translate" and (problem := engine.translationProblem()):
        raise ServiceError(501, problem, code="translation_unavailable")
    engine.admission.check()
    form = await readLimitedForm(request, settings.whisper.max_upload_bytes + FORM_OVERHEAD_BYTES)
    formOwnedByStream = False
    try:
        audio = parseAudioForm(form, task, settings, engine.supportedLanguages())
        if not audio.stream:
            return renderResponse(await untilDisconnect(request, engine.transcribe(audio.job)), audio)
        response = await streamResponse(engine, audio, form)
        formOwnedByStream = True
        return response
    except ClientDisconnected:  # the job was cancelled between segments; the answer goes nowhere
        return Response(status_code=CLIENT_CLOSED_STATUS)
    finally:
        if not formOwnedByStream:
            await form.close()


@router.post("/v1/audio/transcriptions")
async def createTranscription(request: Request) -> Response:
    """Transcribe an uploaded recording (OpenAI's multipart contract; stream=true for SSE events)."""
    return await handleAudio(request, "transcribe")


@router.post("/v1/audio/translations")
async def createTranslation(request: Request) -> Response:
    """Translate an uploaded recording into English text."""
    return await handleAudio(request, "translate")


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness plus the model state and the queue; metadata only."""
    engine: WhisperEngine = request.app.state.engine
    loaded = engine.models.get(engine.modelNameFor("transcribe"))
    return JSONResponse({
        "status": "ok", "model": engine.settings.model, "loaded": bool(loaded and loaded.isLoaded),
        "device": loaded.device if loaded else None, "computeType": loaded.computeType if loaded else None,
        "running": engine.admission.running, "waiting": engine.admission.waiting,
        "maxConcurrent": engine.admission.maxConcurrent, "maxQueue": engine.admission.maxQueue,
    })


def logRequest(meta: RequestMeta) -> None:
    """Access log: metadata only, never audio or text."""
    logger.info("%s %s %s %.3fs id=%s", meta.method, meta.path, meta.status, meta.durationSeconds or 0.0,
                meta.requestId)


@contextlib.asynccontextmanager
async def whisperLifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the transcription model once before serving; unload it when idle; free it on exit."""
    engine: WhisperEngine = app.state.engine
    try:
        await asyncio.to_thread(engine.preload)
    except ModelLoadError as exc:
        logger.error("whisper service cannot start: %s", exc)
        raise
    unloader = asyncio.create_task(engine.runIdleUnloader(), name="whisper-idle-unload")
    try:
        yield
    finally:
        unloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await unloader
        engine.close()


def createWhisperApp(settings: Settings, engine: WhisperEngine | None = None) -> FastAPI:
    """Build the whisper service for the given settings (and an engine whose model may already be loaded)."""
    app = FastAPI(title="PowerOn whisper service", version="1.0.0", lifespan=whisperLifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.engine = engine or WhisperEngine(settings.whisper)
    installErrorHandlers(app)
    app.include_router(router)
    app.add_middleware(RequestContextMiddleware, observers=[logRequest])
    return app


def bindHostProblem(host: str, allowPrivate: bool) -> str | None:
    """Why the keyless service must not bind to ``host``, or None: loopback only, private addresses only with
    [whisper] allow_private_bind; never 0.0.0.0/:: (every interface) or names other than localhost."""
    if host == "localhost":
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_loopback:
        return None
    if address is not None and address.is_private and not address.is_unspecified:
        if allowPrivate:
            return None
        return (f"[whisper] host = {host} is a private address; the whisper service has no keys, so it binds to "
                "loopback only unless [whisper] allow_private_bind = true")
    return (f"[whisper] host = {host} is not a loopback or private address; the whisper service has no keys and "
            "must only be reachable from this server")


def main() -> None:
    try:
        settings = loadSettings()
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc}")
    if problem := bindHostProblem(settings.whisper.host, settings.whisper.allow_private_bind):
        sys.exit(f"configuration error: {problem}")
    switchOffNativeTelemetry()  # before the engine can import onnxruntime (faster-whisper's VAD)
    if not settings.whisper.allow_download:
        os.environ["HF_HUB_OFFLINE"] = "1"
    logging.basicConfig(level=settings.server.log_level.upper(), format="%(message)s")
    engine = WhisperEngine(settings.whisper)
    try:
        engine.preload()
    except ModelLoadError as exc:
        sys.exit(f"whisper service cannot start: {exc}")
    uvicorn.run(createWhisperApp(settings, engine), host=settings.whisper.host, port=settings.whisper.port,
                loop="uvloop",
                http="httptools", access_log=False, log_level=settings.server.log_level,
                timeout_graceful_shutdown=int(settings.server.graceful_shutdown_seconds))

