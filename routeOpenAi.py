"""OpenAI-compatible API for Cursor, F13/KIVA and OpenAI-SDK clients (Authorization: Bearer, OpenAI keys).

Chat completions are translated from Ollama's native ``/api/chat`` (``openaiCompat``), never passed through
Ollama's own ``/v1`` layer. Streams are SSE, flushed line by line; the upstream request is closed as soon as the
client goes away (also while a non-streaming answer is still being generated).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from core.clientDisconnect import (
    CLIENT_CLOSED_STATUS,
    ClientDisconnected,
    RelayResponse,
    UpstreamSseResponse,
    untilDisconnect,
)
from core.errors import ServiceError
from core.leanRoute import LeanRoute
from core.offload import offloadOf
from core.requestContext import RequestMeta, getMeta
from core.turns import takeTurn
from guard.jsonBody import parseJsonBody
from guard.requestLimits import checkChatBudget
from openaiCompat import wireSchemas
from openaiCompat.basics import invalid, requireModelName
from openaiCompat.chatRequest import ChatPlan, buildChatPlan
from openaiCompat.chatResponse import DONE_FRAME, ChatStreamTranslator, chatCompletion, errorFrame, usageOf
from openaiCompat.embeddings import embeddingInputs, embeddingOptions, embeddingResponse
from openaiCompat.images import carriesImages
from upstream.contextWindow import checkEmbedInputs, observeEmbed
from upstream.dependencies import ModelCallDep, RegistryDep
from upstream.fairQueue import Ticket
from upstream.modelRegistry import ModelRegistry, ResolvedModel
from upstream.routing import PrimedStream, RoutedOllama

router = APIRouter(prefix="/v1", tags=["openai"], route_class=LeanRoute)
logger = logging.getLogger("poweron.openai")
MODEL_OWNER = "poweron"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _modelObject(externalName: str, created: int = 0) -> dict:
    return {"id": externalName, "object": "model", "created": created, "owned_by": MODEL_OWNER}


def _jsonResponse(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _metaOf(request: Request) -> RequestMeta:
    meta = getMeta(request)
    return meta if meta is not None else RequestMeta(requestId="", method=request.method, path=request.url.path)


async def readJsonObject(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (within [limits]; large ones parsed off the event loop), or a 400 saying
    what is wrong with it."""
    raw = await request.body()
    if not raw:
        raise invalid("The request body is empty; send a JSON object")
    try:
        body = await parseJsonBody(raw, request.app.state.settings.limits, offloadOf(request))
    except ValueError as exc:
        raise invalid(f"The request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object")
    return body


@router.get("/models", **wireSchemas.openAiModelsDoc())
async def listModels(registry: RegistryDep) -> dict:
    """The external names that are available right now."""
    return {"object": "list", "data": [_modelObject(spec.externalName) for spec in registry.availableModels()]}


@router.get("/models/{modelId}", **wireSchemas.openAiModelDoc())
async def getModel(modelId: str, registry: RegistryDep) -> dict:
    """One available model, or 404."""
    if not any(spec.externalName == modelId for spec in registry.availableModels()):
        raise registry.unknownModelError(modelId)
    return _modelObject(modelId)


@router.post("/chat/completions", **wireSchemas.chatCompletionsDoc())
async def chatCompletions(request: Request, call: ModelCallDep) -> Response:
    """OpenAI Chat Completions (streaming or not) on Ollama's native /api/chat."""
    settings, registry, ollama = call
    body = await readJsonObject(request)
    checkChatBudget(body, settings)
    resolved = await registry.resolve(requireModelName(body))
    meta = _metaOf(request)
    meta.externalModel = resolved.externalName
    ollama.refuseIfFull(resolved.ollamaName)  # a full queue is a 503 before the payload is built
    if carriesImages(body):  # decoding and re-encoding images on a worker thread, not on the event loop
        plan = await offloadOf(request).run(buildChatPlan, body, resolved, settings, registry.tokens)
    else:
        plan = buildChatPlan(body, resolved, settings, registry.tokens)
    onDone = partial(_observePrompt, plan, registry)
    await takeTurn(request.scope)  # the next steps (admission, the upstream call) in the loop's next turn
    try:
        if plan.stream:
            return await _streamChat(request, ollama, plan, resolved, meta, onDone)
        return await _answerChat(request, ollama, plan, resolved, meta, onDone)
    except ClientDisconnected:
        meta.errorCode = "client_disconnected"
        return Response(status_code=CLIENT_CLOSED_STATUS)


def _observePrompt(plan: ChatPlan, registry: ModelRegistry, done: dict[str, Any]) -> None:
    """Calibrate the prompt-token estimate with the count Ollama reports."""
    if plan.measure is not None:
        plan.measure.observe(registry.tokens, done)


async def _answerChat(request: Request, ollama: RoutedOllama, plan: ChatPlan, resolved: ResolvedModel,
                      meta: RequestMeta, onDone: Callable[[dict[str, Any]], None]) -> Response:
    started = time.perf_counter()
    try:
        answer = await untilDisconnect(request, ollama.chat(plan.payload, resolved.externalName))
    finally:
        meta.upstreamSeconds = time.perf_counter() - started
    await takeTurn(request.scope)  # building and sending the answer in the next turn
    _recordUsage(meta, answer)
    onDone(answer)
    return _jsonResponse(chatCompletion(answer, resolved.externalName, plan.leakedThink))


def _recordUsage(meta: RequestMeta, done: dict[str, Any]) -> None:
    usage = usageOf(done)
    meta.promptTokens, meta.completionTokens = usage["prompt_tokens"], usage["completion_tokens"]


async def _streamChat(request: Request, ollama: RoutedOllama, plan: ChatPlan, resolved: ResolvedModel,
                      meta: RequestMeta, onDone: Callable[[dict[str, Any]], None]) -> Response:
    """Wait for the admission slot and open the upstream stream first (so errors keep their status), then relay
    it as SSE. A request still queued after ``[ollama] queue_notice_seconds`` starts its stream with ``: queued,
    position N`` comment lines (one as often) instead; then errors become error frames."""
    meta.streamed = True
    ticket = ollama.enqueue("/api/chat", plan.payload, None)
    positions = ollama.queuedPositions(ticket, ollama.queueNoticeSeconds)
    try:
        first = await untilDisconnect(request, anext(positions, None))
    except BaseException:
        await positions.aclose()
        raise
    translator = ChatStreamTranslator(resolved.externalName, onDone, plan.leakedThink)
    if first is None:
        stream = await untilDisconnect(request, ollama.openStream("/api/chat", plan.payload, resolved.externalName,
                                                                  ticket=ticket))
        return UpstreamSseResponse(_sseFrames(stream, translator, meta, plan.includeUsage), headers=SSE_HEADERS)
    queued = _queuedSseFrames(ollama, plan, resolved, meta, QueuedStart(ticket, first, positions), translator)
    return UpstreamSseResponse(queued, headers=SSE_HEADERS)


@dataclass(slots=True)
class QueuedStart:
    """A stream request still waiting for its admission slot: its ticket, its first position, the later ones."""

    ticket: Ticket | None
    first: int
    positions: AsyncIterator[int]


def queuedComment(position: int) -> bytes:
    return b": queued, position %d\n\n" % position


async def _queuedSseFrames(ollama: RoutedOllama, plan: ChatPlan, resolved: ResolvedModel, meta: RequestMeta,
                           queued: QueuedStart, translator: ChatStreamTranslator) -> AsyncIterator[bytes]:
    """Queue comments until admitted, then the stream as usual; a refusal (waited too long) is an error frame."""
    positions = queued.positions
    try:
        yield queuedComment(queued.first)
        async for position in positions:
            yield queuedComment(position)
        stream = await ollama.openStream("/api/chat", plan.payload, resolved.externalName, ticket=queued.ticket)
    except ServiceError as exc:
        meta.errorCode = exc.code or exc.errorType
        yield errorFrame(exc)
        yield DONE_FRAME
        return
    finally:
        await positions.aclose()
    async for frame in _sseFrames(stream, translator, meta, plan.includeUsage):
        yield frame


async def _sseFrames(stream: PrimedStream, translator: ChatStreamTranslator, meta: RequestMeta,
                     includeUsage: bool) -> AsyncIterator[bytes]:
    """Role frame, the frames of the upstream chunks as they arrive (those that arrived together are passed on
    together), finish (+usage) frames; an error frame on an upstream failure; always ``[DONE]`` unless the client is
    gone."""
    batches = stream.batches()
    try:
        yield translator.roleFrame()
        async for batch in batches:
            for frames in _slicedFrames(batch, translator, meta, includeUsage):
                yield frames
    except ServiceError as exc:
        meta.errorCode = exc.code or exc.errorType
        yield errorFrame(exc)
    except Exception:
        logger.exception("chat stream failed (request %s)", meta.requestId)
        meta.errorCode = "internal_error"
        yield errorFrame(ServiceError(500, "Internal error while streaming; the request id in the logs tells more",
                                      code="internal_error", errorType="api_error"))
    except BaseException:
        meta.errorCode = "client_disconnected"
        raise
    finally:
        await _closeUpstream(batches, stream, meta)
    yield DONE_FRAME


def _slicedFrames(batch: list[dict[str, Any]], translator: ChatStreamTranslator, meta: RequestMeta,
                  includeUsage: bool) -> Iterator[bytes]:
    """The frames of one batch of chunks, joined, in pieces of at most one relay time slice of work (so a long
    burst still lets the loop turn between pieces; see RelayResponse)."""
    perfCounter, sliceSeconds = time.perf_counter, RelayResponse.SLICE_SECONDS
    pending: list[bytes] = []
    sliceStart = perfCounter()
    for chunk in batch:
        pending.extend(_framesOf(chunk, translator, meta, includeUsage))
        if perfCounter() - sliceStart > sliceSeconds:
            yield b"".join(pending)
            pending.clear()
            sliceStart = perfCounter()
    if pending:
        yield b"".join(pending)


def _framesOf(chunk: dict[str, Any], translator: ChatStreamTranslator, meta: RequestMeta,
              includeUsage: bool) -> list[bytes]:
    frames: list[bytes] = []
    delta = translator.deltaFrame(chunk)
    if delta is not None:
        if meta.ttftSeconds is None:
            meta.ttftSeconds = time.perf_counter() - meta.startTime
        frames.append(delta)
    if chunk.get("done"):
        _recordUsage(meta, chunk)
        frames.append(translator.finishFrame(chunk))
        if includeUsage:
            frames.append(translator.usageFrame(chunk))
    return frames


async def _closeUpstream(batches: Any, stream: PrimedStream, meta: RequestMeta) -> None:
    """Close the upstream response at once (Ollama stops generating), shielded from the cancellation."""
    with anyio.CancelScope(shield=True):
        meta.upstreamSeconds = time.perf_counter() - stream.startedAt
        await stream.aclose()
        await batches.aclose()


def checkEmbeddingModel(resolved: ResolvedModel) -> None:
    if resolved.spec.type != "embedding" and "embedding" not in resolved.capabilities:
        raise invalid(f"The model `{resolved.externalName}` is not an embedding model; use poweron-embed", "model")


@router.post("/embeddings", **wireSchemas.embeddingsDoc())
async def embeddings(request: Request, call: ModelCallDep) -> Response:
    """OpenAI Embeddings (float or base64, optional dimensions) on Ollama's /api/embed."""
    settings, registry, ollama = call
    body = await readJsonObject(request)
    resolved = await registry.resolve(requireModelName(body))
    checkEmbeddingModel(resolved)
    meta = _metaOf(request)
    meta.externalModel = resolved.externalName
    ollama.refuseIfFull(resolved.ollamaName, "embed")  # a full queue is a 503 before any work
    inputs = embeddingInputs(body.get("input"))
    asBase64, dimensions = embeddingOptions(body)
    checkEmbedInputs(registry.tokens, resolved.ollamaName, resolved.window, inputs, "input", resolved.externalName)
    started = time.perf_counter()
    try:
        answer = await untilDisconnect(request, ollama.embed(resolved.ollamaName, inputs, resolved.externalName,
                                                             dimensions, settings.ollama.keep_alive,
                                                             window=resolved.window))
    except ClientDisconnected:
        meta.errorCode = "client_disconnected"
        return Response(status_code=CLIENT_CLOSED_STATUS)
    finally:
        meta.upstreamSeconds = time.perf_counter() - started
    meta.promptTokens = int(answer.get("prompt_eval_count") or 0)
    observeEmbed(registry.tokens, resolved.ollamaName, inputs, resolved.window, answer)
    return _jsonResponse(embeddingResponse(answer, resolved.externalName, asBase64, dimensions))
