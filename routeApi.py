"""Analysis API for the gateway's provider plugin (X-API-Key, analysis keys): model list, image and PDF analysis
with vision models, text tasks (e.g. neutralising personal data) and embeddings. Documents stay in memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from config import ModelSpec, Settings, resolveModel
from core.clientDisconnect import CLIENT_CLOSED_STATUS, ClientDisconnected, RelayResponse, untilDisconnect
from core.errors import ServiceError
from core.leanRoute import LeanRoute
from core.requestContext import RequestMeta, getMeta
from documents import wireSchemas
from documents.analysisRequest import (
    AnalyzeFields,
    EmbedBody,
    StreamMode,
    TextBody,
    parseFields,
    readAnalyzeRequest,
    readJsonBody,
)
from documents.documentAnalysis import (
    Answer,
    ModelCall,
    Usage,
    answerAll,
    checkTextFits,
    combinedAnswer,
    documentCalls,
    doneReasonOf,
    streamCalls,
    textCall,
)
from documents.documentRender import RenderedDocument, RenderJob, detectFileType, parsePageRanges
from upstream.contextWindow import TokenEstimator, checkEmbedInputs, embedPayload, observeEmbed
from upstream.dependencies import ModelCallDep, RegistryDep, SettingsDep
from upstream.modelRegistry import ModelRegistry, ResolvedModel
from upstream.ollamaVersion import imagePixelBudget
from upstream.routing import RoutedOllama
from upstream.schemaGrammar import checkGrammar
from upstream.structuredOutput import parseSchema

router = APIRouter(prefix="/api", tags=["analysis"], route_class=LeanRoute)
EMBED_BATCH_SIZE = 64
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TYPE_CAPABILITIES = {"text": ["completion"], "reasoning": ["completion", "thinking"],
                     "vision": ["completion", "vision"], "embedding": ["embedding"], "stt": ["stt"]}
FIXED_TYPES = frozenset({"embedding", "stt"})
"""Model types whose capabilities never vary by model (other types may gain e.g. vision; Ollama tells)."""


def _jsonResponse(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _metaOf(request: Request) -> RequestMeta:
    meta = getMeta(request)
    return meta if meta is not None else RequestMeta(requestId="", method=request.method, path=request.url.path)


def _milliseconds(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _modelEntry(registry: ModelRegistry, spec: ModelSpec) -> dict[str, Any]:
    cached = registry.cachedCapabilities(spec) if spec.backend == "ollama" else frozenset({"stt"})
    entry: dict[str, Any] = {
        "name": spec.externalName, "type": spec.type, "purpose": spec.purpose,
        "available": registry.isAvailable(spec),
        "capabilities": sorted(cached) if cached is not None else TYPE_CAPABILITIES[spec.type],
        "capabilitiesSource": "ollama" if cached is not None and spec.backend == "ollama" else "configured",
    }
    if spec.maxImagePixels or "vision" in entry["capabilities"]:
        budget = imagePixelBudget(spec.maxImagePixels or registry.settings.documents.default_pixel_budget,
                                  spec.ollamaName, registry.features)
        entry["vision"] = {"maxImagePixels": budget, "imagesPerMessage": spec.imagesPerMessage}
    return entry


@router.get("/models", **wireSchemas.apiModelsDoc())
async def listModels(registry: RegistryDep, settings: SettingsDep) -> Response:
    """Every configured model: type, purpose, whether it is available now, and its capabilities."""
    return _jsonResponse({"models": [_modelEntry(registry, spec) for spec in settings.modelMapping.values()]})


def _namesWith(registry: ModelRegistry, capability: str) -> str:
    names = [spec.externalName for spec in registry.availableModels()
             if capability in (registry.cachedCapabilities(spec) or ())]
    return ", ".join(names) or "none available right now"


def _capabilityError(registry: ModelRegistry, name: str, capability: str, what: str) -> ServiceError:
    return ServiceError(400, f"The model `{name}` cannot {what}; use one of: {_namesWith(registry, capability)}",
                        code="model_capability", param="model")


def _typeRulesOut(spec: ModelSpec | None, capability: str) -> bool:
    """True when the configured model can never have ``capability`` (an embedding or speech-to-text model),
    whatever Ollama or whisper would say: known without asking either."""
    if spec is None:
        return False
    return spec.backend != "ollama" or (spec.type in FIXED_TYPES and capability not in TYPE_CAPABILITIES[spec.type])


async def _resolveWith(registry: ModelRegistry, name: str, capability: str, what: str) -> ResolvedModel:
    """Resolve a model that must have ``capability``; 400 naming the model and the ones that would do. The
    configured type is checked first, so a model of the wrong kind is a 400 even while its backend is down."""
    if _typeRulesOut(resolveModel(registry.settings, name), capability):
        raise _capabilityError(registry, name, capability, what)
    resolved = await registry.resolve(name)
    if capability not in resolved.capabilities or resolved.spec.backend != "ollama":
        raise _capabilityError(registry, name, capability, what)
    return resolved


def _streamMode(stream: StreamMode, request: Request) -> str | None:
    """None (no streaming), "ndjson" or "sse" (``stream: true`` picks SSE when the client accepts only that)."""
    if stream is True:
        return "sse" if "text/event-stream" in request.headers.get("accept", "") else "ndjson"
    return stream or None


def _checkSchemaAndStream(rawSchema: Any, mode: str | None) -> Any:
    schema = parseSchema(rawSchema)
    if schema is not None and mode is not None:
        raise ServiceError(400, "stream cannot be combined with schema: a structured answer is validated as a "
                           "whole; leave out stream", code="invalid_request", param="stream")
    return schema


def _frame(mode: str, event: dict[str, Any]) -> bytes:
    if event["type"] == "queued" and mode == "sse":  # a comment line: keeps proxies and clients patient
        return b": queued, position %d\n\n" % event["position"]
    data = orjson.dumps(event)
    if mode == "sse":
        return b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n"
    return data + b"\n"


def _errorEvent(error: ServiceError) -> dict[str, Any]:
    return {"type": "error", "status": error.status, "detail": error.message, "code": error.code or error.errorType,
            **error.extra}


async def _streamResponse(mode: str, events: AsyncIterator[dict[str, Any]], start: dict[str, Any],
                          finish: Callable[[], dict[str, Any]], meta: RequestMeta, usage: Usage) -> Response:
    """Wait until Ollama accepted the first call (earlier errors stay plain HTTP errors) or the call waited
    ``[ollama] queue_notice_seconds`` for its slot, then stream events: start, [queued ...], [page],
    delta/thinking ..., done — or error as the last event."""
    try:
        first = await events.__anext__()
    finally:
        _recordUsage(meta, usage)
    meta.streamed = True

    async def body() -> AsyncIterator[bytes]:
        try:
            yield _frame(mode, start)
            if first["type"] == "queued":  # still waiting for a model slot: the stream starts with its place
                yield _frame(mode, first)
            async for event in events:
                if event["type"] == "ready":  # Ollama accepted the first call after its wait in the queue
                    continue
                if event["type"] == "delta" and meta.ttftSeconds is None:
                    meta.ttftSeconds = time.perf_counter() - meta.startTime
                yield _frame(mode, event)
            yield _frame(mode, {"type": "done", **finish()})
        except ServiceError as error:
            meta.errorCode = error.code or error.errorType
            yield _frame(mode, _errorEvent(error))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
            meta.errorCode = "client_disconnected"
            raise
        finally:
            await events.aclose()
            _recordUsage(meta, usage)

    mediaType = "text/event-stream" if mode == "sse" else "application/x-ndjson"
    return RelayResponse(body(), media_type=mediaType, headers=STREAM_HEADERS)


def _recordUsage(meta: RequestMeta, usage: Usage) -> None:
    meta.promptTokens, meta.completionTokens = usage.promptTokens, usage.completionTokens
    meta.upstreamSeconds = usage.modelSeconds


BodyBuilder = Callable[[list[Answer], Any], dict[str, Any]]
"""Builds the response body from the answers and the schema (None for streams)."""


async def _respond(request: Request, ollama: RoutedOllama, resolved: ResolvedModel, calls: list[ModelCall],
                   schema: Any, mode: str | None, start: dict[str, Any], bodyOf: BodyBuilder,
                   usage: Usage) -> Response:
    """The whole answer as one JSON body (Ollama's work stops when the client goes away), or streamed events."""
    meta = _metaOf(request)
    if mode is not None:
        answers: list[Answer] = []
        events = streamCalls(ollama, calls, resolved.externalName, usage, answers, len(calls) > 1)
        return await _streamResponse(mode, events, start, partial(bodyOf, answers, None), meta, usage)
    try:
        answers = await untilDisconnect(request, answerAll(ollama, calls, resolved.externalName, usage, schema))
    except ClientDisconnected:
        meta.errorCode = "client_disconnected"
        return Response(status_code=CLIENT_CLOSED_STATUS)
    finally:
        _recordUsage(meta, usage)
    return _jsonResponse(bodyOf(answers, schema))


def _analysisMode(document: RenderedDocument, calls: list[ModelCall]) -> str:
    if len(calls) > 1:
        return "perPage"
    return "combined" if len(document.images) > 1 else "single"


def _documentFacts(resolved: ResolvedModel, document: RenderedDocument, calls: list[ModelCall],
                   renderSeconds: float) -> dict[str, Any]:
    return {"model": resolved.externalName, "fileType": document.fileType, "pagesAnalysed": document.pages,
            "pageCount": document.pageCount, "truncated": document.truncated, "mode": _analysisMode(document, calls),
            "images": [{"page": image.page, "width": image.width, "height": image.height} for image in document.images],
            "durations": {"renderMs": _milliseconds(renderSeconds)}}


def _warnings(document: RenderedDocument | None, answers: list[Answer], maxPages: int) -> list[str]:
    warnings = []
    if document is not None and document.truncated:
        warnings.append(f"The document has {document.pageCount} pages; pages 1-{len(document.images)} were analysed "
                        f"(at most {maxPages} per request); choose others with `pages`, e.g. {maxPages + 1}-"
                        f"{min(document.pageCount, 2 * maxPages)}")
    cut = [answer.pages for answer in answers if answer.doneReason == "length"]
    if cut:
        where = f" (pages {', '.join(str(p) for pages in cut for p in pages)})" if any(cut) else ""
        warnings.append(f"The answer was cut off by the token limit{where}; raise maxTokens")
    return warnings


def _answerFields(answers: list[Answer], schema: Any, usage: Usage, startedAt: float) -> dict[str, Any]:
    body: dict[str, Any] = {"answer": combinedAnswer(answers, schema), "format": "text" if schema is None else "json",
                            "doneReason": doneReasonOf(answers), "usage": usage.asDict()}
    if len(answers) > 1:
        body["pageAnswers"] = [{"pages": answer.pages, "answer": answer.text if schema is None else answer.value}
                               for answer in answers]
    thinking = "\n\n".join(answer.thinking for answer in answers if answer.thinking)
    if thinking:
        body["thinking"] = thinking
    body["totalMs"] = _milliseconds(time.perf_counter() - startedAt)
    body["modelMs"] = _milliseconds(usage.modelSeconds)
    return body


def _analysisBody(facts: dict[str, Any], document: RenderedDocument, maxPages: int, usage: Usage, startedAt: float,
                  answers: list[Answer], schema: Any) -> dict[str, Any]:
    fields = _answerFields(answers, schema, usage, startedAt)
    durations = {**facts["durations"], "modelMs": fields.pop("modelMs"), "totalMs": fields.pop("totalMs")}
    return {**facts, **fields, "durations": durations, "warnings": _warnings(document, answers, maxPages)}


async def _render(request: Request, settings: Settings, resolved: ResolvedModel, data: bytes,
                  fields: AnalyzeFields) -> tuple[RenderedDocument, float]:
    job = RenderJob(data, parsePageRanges(fields.pages), settings.documents.max_pdf_pages,
                    resolved.pixelBudget(settings.documents.default_pixel_budget),
                    settings.limits.max_image_pixels, fields.password)
    startedAt = time.perf_counter()
    document = await request.app.state.renderPool.render(job, _metaOf(request).keyName)
    return document, time.perf_counter() - startedAt


@router.post("/analyze", **wireSchemas.analyzeDoc())
async def analyze(request: Request, call: ModelCallDep) -> Response:
    """Analyse an image or PDF with a vision model (multipart upload, or JSON with the file in base64)."""
    settings, registry, ollama = call
    startedAt, meta = time.perf_counter(), _metaOf(request)
    fields, data = await readAnalyzeRequest(request, settings)
    detectFileType(data)
    parsePageRanges(fields.pages)
    mode = _streamMode(fields.stream, request)
    schema = _checkSchemaAndStream(fields.schema_, mode)
    # the model (and Ollama) before rendering: a dead upstream is a 503 at once, never after a render
    resolved = await _resolveWith(registry, fields.model, "vision", "read images or PDFs (no vision capability)")
    meta.externalModel = resolved.externalName
    ollama.refuseIfFull(resolved.ollamaName)  # the model's queue is full: 503 before rendering
    checkGrammar(schema, resolved.features.label)
    checkTextFits(settings, resolved, fields, registry.tokens)  # a prompt too long for the window: 413 unrendered
    try:  # a client gone while its document renders stops the render (the worker is replaced)
        document, renderSeconds = await untilDisconnect(request, _render(request, settings, resolved, data, fields))
    except ClientDisconnected:
        meta.errorCode = "client_disconnected"
        return Response(status_code=CLIENT_CLOSED_STATUS)
    calls = documentCalls(settings, resolved, document, fields, schema, registry.tokens)
    facts = _documentFacts(resolved, document, calls, renderSeconds)
    usage = Usage()
    bodyOf = partial(_analysisBody, facts, document, settings.documents.max_pdf_pages, usage, startedAt)
    return await _respond(request, ollama, resolved, calls, schema, mode, {"type": "start", **facts}, bodyOf, usage)


@router.post("/text", **wireSchemas.textDoc())
async def text(request: Request, call: ModelCallDep) -> Response:
    """Run an instruction on a text with a text model, e.g. replace personal data by placeholders."""
    settings, registry, ollama = call
    startedAt, meta = time.perf_counter(), _metaOf(request)
    fields = parseFields(TextBody, await readJsonBody(request))
    mode = _streamMode(fields.stream, request)
    schema = _checkSchemaAndStream(fields.schema_, mode)
    resolved = await _resolveWith(registry, fields.model, "completion", "generate text (it is not a chat model)")
    meta.externalModel = resolved.externalName
    ollama.refuseIfFull(resolved.ollamaName)
    checkGrammar(schema, resolved.features.label)
    call = textCall(settings, resolved, fields, schema, registry.tokens)
    usage = Usage()
    bodyOf = partial(_textBody, resolved, usage, startedAt)
    return await _respond(request, ollama, resolved, [call], schema, mode,
                          {"type": "start", "model": resolved.externalName}, bodyOf, usage)


def _textBody(resolved: ResolvedModel, usage: Usage, startedAt: float, answers: list[Answer],
              schema: Any) -> dict[str, Any]:
    fields = _answerFields(answers, schema, usage, startedAt)
    durations = {"modelMs": fields.pop("modelMs"), "totalMs": fields.pop("totalMs")}
    return {"model": resolved.externalName, **fields, "durations": durations,
            "warnings": _warnings(None, answers, 0)}


def _checkTexts(texts: list[str]) -> None:
    for index, item in enumerate(texts):
        if not item.strip():
            raise ServiceError(400, f"texts[{index}] is empty; every text needs content", code="invalid_request",
                               param=f"texts[{index}]")


async def _embedBatches(ollama: RoutedOllama, resolved: ResolvedModel, fields: EmbedBody,
                        keepAlive: str, tokens: TokenEstimator) -> tuple[list[list[float]], int]:
    vectors: list[list[float]] = []
    promptTokens = 0
    for start in range(0, len(fields.texts), EMBED_BATCH_SIZE):
        batch = fields.texts[start:start + EMBED_BATCH_SIZE]
        payload = {**embedPayload(resolved.ollamaName, batch, resolved.window, fields.truncate),
                   "keep_alive": keepAlive}
        if fields.dimensions:
            payload["dimensions"] = fields.dimensions
        answer = await ollama.postJson("/api/embed", payload, resolved.externalName)
        observeEmbed(tokens, resolved.ollamaName, batch, resolved.window, answer)
        embeddings = answer.get("embeddings") if isinstance(answer, dict) else None
        if not isinstance(embeddings, list) or len(embeddings) != len(batch):
            raise ServiceError(502, "Ollama returned a different number of embeddings than texts sent",
                               code="upstream_error")
        vectors.extend(embeddings)
        promptTokens += int(answer.get("prompt_eval_count") or 0)
    return vectors, promptTokens


@router.post("/embed", **wireSchemas.embedDoc())
async def embed(request: Request, call: ModelCallDep) -> Response:
    """Texts to embedding vectors (poweron-embed by default), sent to Ollama in batches."""
    settings, registry, ollama = call
    meta = _metaOf(request)
    fields = parseFields(EmbedBody, await readJsonBody(request))
    _checkTexts(fields.texts)
    resolved = await _resolveWith(registry, fields.model, "embedding", "compute embeddings")
    meta.externalModel = resolved.externalName
    ollama.refuseIfFull(resolved.ollamaName, "embed")
    if not fields.truncate:
        checkEmbedInputs(registry.tokens, resolved.ollamaName, resolved.window, fields.texts, "texts",
                         resolved.externalName)
    startedAt = time.perf_counter()
    try:
        vectors, promptTokens = await untilDisconnect(
            request, _embedBatches(ollama, resolved, fields, settings.ollama.keep_alive, registry.tokens))
    except ClientDisconnected:
        meta.errorCode = "client_disconnected"
        return Response(status_code=CLIENT_CLOSED_STATUS)
    meta.upstreamSeconds, meta.promptTokens = time.perf_counter() - startedAt, promptTokens
    return _jsonResponse({"model": resolved.externalName, "embeddings": vectors,
                          "dimensions": len(vectors[0]) if vectors else 0, "count": len(vectors),
                          "usage": {"promptTokens": promptTokens},
                          "durations": {"modelMs": _milliseconds(meta.upstreamSeconds)}})
