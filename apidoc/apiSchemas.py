"""The wire schemas of the service: the request and response bodies of every route as pydantic models, and the
OpenAPI document built from them (``installOpenApi``).

The handlers read raw requests on the hot path and validate by hand (``openAiTranslate``, ``whisperService``) or
with the field models of ``analysisRequest``, which are reused here as they are. The other models below only
describe: they are attached to the routes with ``openapi_extra`` (request bodies) and ``responses`` (every status a
route really returns, with OpenAI's error envelope on ``/v1/*`` and ``{detail, code, requestId}`` elsewhere).
Streams are described per item (``itemSchema``: one SSE event or one NDJSON line). ``tests/test_openApiSchemas.py``
checks real responses against the document, ``tests/test_openApiFuzz.py`` fuzzes the service with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from config import ModelType
from documents.analysisRequest import AnalyzeFields, AnalyzeJsonBody, EmbedBody, TextBody
from guard.security import KEY_CLASS_API, KEY_CLASS_BY_PREFIX, KEY_CLASS_OPENAI
from openaiCompat.openAiTranslate import (
    DIMENSIONS_RANGE,
    MAX_EMBEDDING_INPUTS,
    MAX_TOKENS_RANGE,
    SEED_RANGE,
    TOP_K_RANGE,
)

REF_PREFIX = "#/components/schemas/"
SECURITY_SCHEMES = {
    KEY_CLASS_API: ("ApiKeyAuth", {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                   "description": "An analysis key ([auth] api_keys); /api/* only"}),
    KEY_CLASS_OPENAI: ("BearerAuth", {"type": "http", "scheme": "bearer",
                                      "description": "An OpenAI key ([auth] openai_keys); /v1/* only"}),
}
STATUS_MEANINGS = {
    400: "Invalid request: a field is missing, malformed or out of range (the message names it)",
    401: "No key, an unknown key, or a key of the other class",
    404: "Unknown model, or configured but not available (not pulled, or speech-to-text switched off)",
    413: "Body, file or image over the configured limits",
    415: "Unsupported media type of the body, or unsupported file type",
    422: "The document cannot be read or rendered, or the answer does not match the schema",
    429: "The key's rate or concurrency limit is reached; retry after Retry-After seconds",
    501: "Translation needs a translation model on the speech-to-text service",
    502: "The upstream (Ollama or the speech-to-text service) failed",
    503: "The upstream is unreachable or busy, or every render worker is busy; retry after Retry-After seconds",
    504: "The upstream did not answer in time",
}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "integer", "minimum": 0}}}
TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
"""A 1x1 PNG, base64 (the example document of /api/analyze)."""


class WireModel(BaseModel):
    """A body as it is on the wire: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


class OpenWireModel(BaseModel):
    """A body that may carry more fields than these (accepted and ignored, as OpenAI clients send many)."""

    model_config = ConfigDict(extra="allow")


def omitted(description: str = "", **constraints: Any) -> Any:
    """A field that is left out of the body when it does not apply (never sent as null)."""
    return Field(default=None, description=description or None, **constraints)


# ------------------------------------------------------------------------------------------------ error envelopes


class OpenAiErrorDetail(WireModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error, "
                                  "service_unavailable, timeout or api_error")
    param: str | None = Field(description="The request field the error is about")
    code: str | None = Field(description="The service's error code, e.g. model_not_found")


class OpenAiError(WireModel):
    """OpenAI's error envelope, on every /v1 error (and as the data of an error event in a /v1 stream)."""

    error: OpenAiErrorDetail


class ApiError(WireModel):
    """The error shape of every route outside /v1."""

    detail: str = Field(description="What is wrong and what to do")
    code: str = Field(description="Machine-readable error code, e.g. invalid_pages")
    requestId: str | None = Field(description="Also in the X-Request-ID header")
    retryAfter: int = omitted("429: seconds until the next request is admitted")
    limit: int = omitted("429 rate limit: the burst of the key")
    remaining: int = omitted("429 rate limit: requests left in the bucket")
    concurrentLimit: int = omitted("429 concurrency limit: requests the key may have in flight")
    rawAnswer: str = omitted("422 schema_mismatch: the model's answer")
    validationError: str = omitted("422 schema_mismatch: why the answer does not match")
    doneReason: str = omitted("422 schema_mismatch: why the model stopped")


# ------------------------------------------------------------------------------------------------ health


class OllamaHealth(WireModel):
    reachable: bool
    version: str | None
    reason: str | None = Field(description="Why Ollama counts as unreachable (null while it answers)")


class WhisperHealth(WireModel):
    enabled: bool
    reachable: bool


class ModelCounts(WireModel):
    available: int
    configured: int
    names: list[str] = Field(description="External names of the models available now")


class Health(WireModel):
    """Overall status; no secrets."""

    status: Literal["ok", "degraded"]
    ollama: OllamaHealth
    whisper: WhisperHealth
    models: ModelCounts


class Ready(WireModel):
    status: Literal["healthy"]
    ollama_version: str | None


class NotReady(WireModel):
    status: Literal["unhealthy"]
    reason: str | None


# ------------------------------------------------------------------------------------------------ analysis API

FileType = Literal["pdf", "png", "jpeg", "webp", "gif", "tiff", "bmp"]
AnalysisMode = Literal["single", "combined", "perPage"]


class VisionFacts(WireModel):
    maxImagePixels: int
    imagesPerMessage: int = Field(description="0: any number per message; 1: pages are analysed one by one")


class ApiModel(WireModel):
    name: str
    type: ModelType
    purpose: str
    available: bool
    capabilities: list[str]
    capabilitiesSource: Literal["ollama", "configured"]
    vision: VisionFacts = omitted("Models that read images")


class ApiModelList(WireModel):
    models: list[ApiModel]


class AnalyzeForm(AnalyzeFields):
    """/api/analyze as multipart/form-data: the file and the fields of the JSON variant as form fields."""

    file: bytes = Field(description="The document: PDF, PNG, JPEG, WebP, GIF, TIFF or BMP (type from the content)")
    schema_: str | None = Field(None, alias="schema", description="A JSON Schema as JSON text, or \"json\"")


class PreviewForm(WireModel):
    """/api/preview (multipart/form-data): the fields of routeWeb.PreviewFields and the file."""

    file: bytes = Field(description="The document: PDF or an image")
    pages: str | None = Field(None, max_length=200)
    model: str | None = Field(None, max_length=200)
    password: str | None = Field(None, max_length=1024)


class PageImage(WireModel):
    page: int
    width: int
    height: int


class Thumbnail(PageImage):
    dataUrl: str = Field(description="data:image/jpeg;base64,...")


class Preview(WireModel):
    model: str
    fileType: FileType
    pageCount: int
    pagesAnalysed: list[int]
    truncated: bool
    mode: AnalysisMode
    thumbnails: list[Thumbnail]


class ApiUsage(WireModel):
    promptTokens: int
    completionTokens: int
    totalTokens: int


class PageAnswer(WireModel):
    pages: list[int]
    answer: Any = Field(description="The page group's text, or its JSON value with a schema")


class AnalyzeDurations(WireModel):
    renderMs: float
    modelMs: float
    totalMs: float


class TextDurations(WireModel):
    modelMs: float
    totalMs: float


class DocumentFacts(WireModel):
    model: str
    fileType: FileType
    pagesAnalysed: list[int]
    pageCount: int
    truncated: bool
    mode: AnalysisMode
    images: list[PageImage]


class AnswerFields(WireModel):
    answer: Any = Field(description="Text, or the JSON value when a schema was given")
    format: Literal["text", "json"]
    doneReason: str = Field(description="stop, or length when the token limit cut the answer")
    usage: ApiUsage
    pageAnswers: list[PageAnswer] = omitted("perPage mode: the answer of each page group")
    thinking: str = omitted("Thinking models: the reasoning")
    warnings: list[str]


class Analysis(DocumentFacts, AnswerFields):
    """The answer of /api/analyze."""

    durations: AnalyzeDurations


class TextAnswer(AnswerFields):
    """The answer of /api/text."""

    model: str
    durations: TextDurations


class EmbedUsage(WireModel):
    promptTokens: int


class EmbedDurations(WireModel):
    modelMs: float


class Embeddings(WireModel):
    """The answer of /api/embed: one vector per text, in order."""

    model: str
    embeddings: list[list[float]]
    dimensions: int
    count: int
    usage: EmbedUsage
    durations: EmbedDurations


class StartDurations(WireModel):
    renderMs: float


class AnalyzeStartEvent(DocumentFacts):
    type: Literal["start"]
    durations: StartDurations


class TextStartEvent(WireModel):
    type: Literal["start"]
    model: str


class PageEvent(WireModel):
    type: Literal["page"]
    pages: list[int]
    marker: str


class DeltaEvent(WireModel):
    type: Literal["delta", "thinking"]
    text: str


class AnalyzeDoneEvent(Analysis):
    type: Literal["done"]


class TextDoneEvent(TextAnswer):
    type: Literal["done"]


class ErrorEvent(WireModel):
    """The last event of a stream that failed after it started."""

    type: Literal["error"]
    status: int
    detail: str
    code: str


ANALYZE_EVENTS = (AnalyzeStartEvent, PageEvent, DeltaEvent, AnalyzeDoneEvent, ErrorEvent)
TEXT_EVENTS = (TextStartEvent, DeltaEvent, TextDoneEvent, ErrorEvent)
API_EVENT_NAMES = ("start", "page", "delta", "thinking", "done", "error")

# ------------------------------------------------------------------------------------------------ OpenAI API

ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
NonEmpty = Annotated[str, Field(min_length=1)]
ModelName = Annotated[str, Field(min_length=1, pattern=r"\S", description="A name from GET /v1/models")]
MaxTokens = Annotated[int, Field(ge=MAX_TOKENS_RANGE[0], le=MAX_TOKENS_RANGE[1])]


class ModelObject(WireModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(WireModel):
    object: Literal["list"]
    data: list[ModelObject]


class ImageUrl(OpenWireModel):
    url: str = Field(description="data:image/...;base64,<data>; remote URLs are refused")
    detail: str | None = None


class TextPart(OpenWireModel):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ImagePart(OpenWireModel):
    type: Literal["image_url", "input_image"]
    image_url: ImageUrl | str


class FileData(OpenWireModel):
    file_data: str = Field(description="data:image/...;base64,<data> (PDFs go to POST /api/analyze)")
    filename: str | None = None


class FilePart(OpenWireModel):
    type: Literal["file"]
    file: FileData


class RefusalPart(OpenWireModel):
    type: Literal["refusal"]
    refusal: str | None = None


ContentPart = TextPart | ImagePart | FilePart | RefusalPart
Content = str | list[ContentPart] | None


class FunctionCall(OpenWireModel):
    name: NonEmpty
    arguments: str | dict[str, Any] | None = Field(None, description="A JSON object, encoded as a string")


class ToolCall(OpenWireModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenWireModel):
    role: ChatRole
    content: Content = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: earlier tool calls")
    tool_call_id: str | None = Field(None, description="tool: the id of the call this result answers")
    reasoning_content: str | None = Field(None, description="assistant: earlier reasoning (sent back as thinking)")


class FunctionDefinition(OpenWireModel):
    name: NonEmpty
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")


class Tool(OpenWireModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FlatTool(FunctionDefinition):
    """A Responses-API tool: name and parameters at the top level."""

    type: Literal["function"] = "function"


class NamedFunction(OpenWireModel):
    name: str


class NamedToolChoice(OpenWireModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(OpenWireModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="A JSON Schema with local $refs only")
    strict: bool | None = None


class ResponseFormat(OpenWireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(OpenWireModel):
    include_usage: bool | None = None


class ChatParameters(OpenWireModel):
    """What a chat request may carry besides its messages; unknown fields are accepted and ignored."""

    model: Annotated[ModelName, Field(examples=["poweron-text-general"])]
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="include_usage: a usage chunk before [DONE]")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0, le=10)] | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = Field(None, description="Wins over max_tokens")
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    top_k: Annotated[int, Field(ge=TOP_K_RANGE[0], le=TOP_K_RANGE[1])] | None = None
    stop: NonEmpty | list[NonEmpty] | None = None
    n: Literal[1] | None = Field(None, description="Only 1: one choice per request")
    response_format: ResponseFormat | None = None
    tools: list[Tool | FlatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | NamedFunction | None = None
    reasoning_effort: ReasoningEffort | None = Field(None, description="Ollama's think; dropped on models that "
                                                                       "cannot think")


class ChatCompletionRequest(ChatParameters):
    """OpenAI Chat Completions."""

    messages: list[ChatMessage] = Field(min_length=1)


class ResponsesItem(OpenWireModel):
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: ChatRole | None = None
    content: Content = None
    call_id: str | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ReasoningOptions(OpenWireModel):
    effort: ReasoningEffort | None = None


class TextFormat(OpenWireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(OpenWireModel):
    format: TextFormat | None = None


class ResponsesShapedRequest(ChatParameters):
    """A Responses-API body posted to /v1/chat/completions (Cursor does so); answered as a chat completion."""

    input: str | list[ResponsesItem]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    reasoning: ReasoningOptions | None = None
    text: TextOptions | None = None


class FunctionCallOut(WireModel):
    name: str
    arguments: str = Field(description="A JSON object, encoded as a string")


class ToolCallOut(WireModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(WireModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] = omitted()
    reasoning_content: str = omitted("The reasoning of thinking models")


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(WireModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatUsage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(WireModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: ChatUsage


class ToolCallDelta(ToolCallOut):
    index: int


class ChatDelta(WireModel):
    role: Literal["assistant"] = omitted()
    content: str = omitted()
    reasoning_content: str = omitted()
    tool_calls: list[ToolCallDelta] = omitted()


class ChunkChoice(WireModel):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(WireModel):
    """One SSE event of a streamed chat completion (choices is empty in the usage chunk)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage = omitted("Only in the last chunk, with stream_options.include_usage")


class EmbeddingRequest(OpenWireModel):
    """OpenAI Embeddings on poweron-embed."""

    model: Annotated[ModelName, Field(examples=["poweron-embed"])]
    input: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] = Field(
        description="Text or texts; token arrays are not supported")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=DIMENSIONS_RANGE[0], le=DIMENSIONS_RANGE[1])] | None = None


class Embedding(WireModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or little-endian float32 in base64")


class EmbeddingUsage(WireModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(WireModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TranscriptionForm(OpenWireModel):
    """OpenAI's audio upload (multipart/form-data), validated by the speech-to-text service."""

    file: bytes = Field(description="The recording (mp3, wav, ogg, m4a, webm, flac, ...)")
    model: str = Field(description="poweron-transcribe (whisper-1 is an alias)", examples=["poweron-transcribe"])
    language: str | None = Field(None, description="ISO-639-1 code; transcriptions only")
    prompt: str | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = Field(None, description="0: whisper's fallback ladder")
    response_format: Literal["json", "text", "srt", "vtt", "verbose_json"] | None = None
    stream: bool | None = Field(None, description="SSE transcript.text.* events; json and text only")
    timestamp_granularities: list[Literal["segment", "word"]] | None = Field(
        None, alias="timestamp_granularities[]", description="word needs verbose_json")


class DurationUsage(WireModel):
    type: Literal["duration"]
    seconds: float


class Transcription(WireModel):
    text: str
    usage: DurationUsage = omitted("Transcriptions only")


class TranscriptWord(WireModel):
    word: str
    start: float
    end: float


class TranscriptSegment(WireModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class VerboseTranscription(WireModel):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptSegment]
    words: list[TranscriptWord] = omitted("With timestamp_granularities[]=word")
    usage: DurationUsage = omitted("Transcriptions only")


class TranscriptDelta(WireModel):
    type: Literal["transcript.text.delta"]
    delta: str


class TranscriptDone(WireModel):
    type: Literal["transcript.text.done"]
    text: str


FORM_MODELS: tuple[type[BaseModel], ...] = (AnalyzeForm, PreviewForm, TranscriptionForm)
"""Bodies sent as multipart/form-data."""
DOCUMENTED_MODELS: tuple[type[BaseModel], ...] = (
    OpenAiError, ApiError, Health, Ready, NotReady, ApiModelList, AnalyzeForm, AnalyzeJsonBody, PreviewForm,
    Preview, Analysis, TextBody, TextAnswer, EmbedBody, Embeddings, *ANALYZE_EVENTS, *TEXT_EVENTS, ModelObject,
    ModelList, ChatCompletionRequest, ResponsesShapedRequest, ChatCompletion, ChatCompletionChunk, EmbeddingRequest,
    EmbeddingList, TranscriptionForm, Transcription, VerboseTranscription, TranscriptDelta, TranscriptDone,
)


# ------------------------------------------------------------------------------------------------ route documentation


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF_PREFIX + model.__name__}


def anyOf(models: Iterable[type[BaseModel]]) -> dict[str, Any]:
    return {"anyOf": [ref(model) for model in models]}


def sseContent(dataModels: Iterable[type[BaseModel]], eventNames: Iterable[str] = (),
               doneMarker: str | None = None) -> dict[str, Any]:
    """text/event-stream: each event's data is JSON of one of ``dataModels`` (or the literal ``doneMarker``)."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": anyOf(dataModels)}
    if doneMarker is not None:
        data = {"anyOf": [{"const": doneMarker}, data]}
    names = list(eventNames)
    event = {"enum": names} if names else {"type": "string"}
    return {"itemSchema": {"type": "object", "required": ["data"], "properties": {"event": event, "data": data}}}


def ndjsonContent(lineModels: Iterable[type[BaseModel]]) -> dict[str, Any]:
    """application/x-ndjson: each line is JSON of one of ``lineModels``."""
    return {"itemSchema": anyOf(lineModels)}


def operationDoc(ok: dict[str, Any], errors: Iterable[int], envelope: type[BaseModel],
                 body: dict[str, Any] | None = None, okDescription: str = "Success") -> dict[str, Any]:
    """Keyword arguments for a route decorator: ``responses`` (200 content and every error status with the
    envelope) and the request body as ``openapi_extra``."""
    responses: dict[int | str, Any] = {200: {"description": okDescription, "content": ok}}
    for status in errors:
        described: dict[str, Any] = {"description": STATUS_MEANINGS[status],
                                     "content": {"application/json": {"schema": ref(envelope)}}}
        if status in (429, 503):
            described["headers"] = RETRY_AFTER_HEADER
        responses[status] = described
    doc: dict[str, Any] = {"responses": responses}
    if body is not None:
        doc["openapi_extra"] = {"requestBody": {"required": True, "content": body}}
    return doc


def jsonOf(model: type[BaseModel] | dict[str, Any], examples: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": ref(model) if isinstance(model, type) else model}
    if examples:
        media["examples"] = {name: {"value": value} for name, value in examples.items()}
    return {"application/json": media}


def multipartOf(model: type[BaseModel]) -> dict[str, Any]:
    return {"multipart/form-data": {"schema": ref(model),
                                    "encoding": {"file": {"contentType": "application/octet-stream"}}}}


def textPlain() -> dict[str, Any]:
    return {"text/plain": {"schema": {"type": "string"}}}


API_ERRORS_GET = (401, 429)
API_MODEL_ERRORS = (400, 401, 404, 413, 429, 502, 503, 504)
OPENAI_MODEL_ERRORS = (400, 401, 404, 413, 429, 502, 503, 504)


def healthDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(Health), (), ApiError, okDescription="Status of the service and its upstreams")


def livelinessDoc() -> dict[str, Any]:
    return operationDoc(textPlain(), (), ApiError, okDescription="The process is alive")


def readinessDoc() -> dict[str, Any]:
    doc = operationDoc(jsonOf(Ready), (), ApiError, okDescription="Ollama is reachable")
    doc["responses"][503] = {"description": "Ollama is not reachable", "content": jsonOf(NotReady)}
    return doc


def apiModelsDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(ApiModelList), API_ERRORS_GET, ApiError,
                        okDescription="Every configured model, available or not")


def analyzeDoc() -> dict[str, Any]:
    example = {"prompt": "What is in this image?", "file": TINY_PNG}
    body = {**multipartOf(AnalyzeForm), **jsonOf(AnalyzeJsonBody, {"base64": example,
                                                                    "streamed": {**example, "stream": "ndjson"}})}
    ok = {**jsonOf(Analysis), "application/x-ndjson": ndjsonContent(ANALYZE_EVENTS),
          "text/event-stream": sseContent(ANALYZE_EVENTS, API_EVENT_NAMES)}
    return operationDoc(ok, (*API_MODEL_ERRORS, 415, 422), ApiError, body,
                        "The answer, or its events with stream")


def textDoc() -> dict[str, Any]:
    examples = {"plain": {"prompt": "Summarise", "text": "Invoice 17, total CHF 120."},
                "streamed": {"prompt": "Summarise", "text": "Invoice 17", "stream": "sse"},
                "structured": {"prompt": "Extract the total", "text": "Total CHF 120",
                               "schema": {"type": "object", "properties": {"total": {"type": "number"}}}}}
    ok = {**jsonOf(TextAnswer), "application/x-ndjson": ndjsonContent(TEXT_EVENTS),
          "text/event-stream": sseContent(TEXT_EVENTS, API_EVENT_NAMES)}
    return operationDoc(ok, (*API_MODEL_ERRORS, 422), ApiError, jsonOf(TextBody, examples),
                        "The answer, or its events with stream")


def embedDoc() -> dict[str, Any]:
    examples = {"texts": {"texts": ["Rechnung 2024-17", "Mahnung"]}}
    return operationDoc(jsonOf(Embeddings), API_MODEL_ERRORS, ApiError, jsonOf(EmbedBody, examples),
                        "One vector per text")


def previewDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(Preview), (400, 401, 404, 413, 415, 422, 429, 503), ApiError,
                        multipartOf(PreviewForm), "Thumbnails of the pages /api/analyze would read")


def openAiModelsDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(ModelList), (401, 429), OpenAiError, okDescription="The models available now")


def openAiModelDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(ModelObject), (401, 404, 429), OpenAiError, okDescription="The model")


def chatCompletionsDoc() -> dict[str, Any]:
    hello = {"model": "poweron-text-general", "messages": [{"role": "user", "content": "Hello"}]}
    examples = {"chat": hello, "streamed": {**hello, "stream": True, "stream_options": {"include_usage": True}},
                "tools": {**hello, "tools": [{"type": "function", "function": {
                    "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]},
                "responsesShaped": {"model": "poweron-text-general", "input": "Hello", "instructions": "Be brief"}}
    body = jsonOf({"anyOf": [ref(ChatCompletionRequest), ref(ResponsesShapedRequest)]}, examples)
    ok = {**jsonOf(ChatCompletion),
          "text/event-stream": sseContent((ChatCompletionChunk, OpenAiError), doneMarker="[DONE]")}
    return operationDoc(ok, OPENAI_MODEL_ERRORS, OpenAiError, body, "A chat completion, or its chunks with stream")


def embeddingsDoc() -> dict[str, Any]:
    examples = {"one": {"model": "poweron-embed", "input": "Rechnung"},
                "base64": {"model": "poweron-embed", "input": ["a", "b"], "encoding_format": "base64",
                           "dimensions": 256}}
    return operationDoc(jsonOf(EmbeddingList), OPENAI_MODEL_ERRORS, OpenAiError, jsonOf(EmbeddingRequest, examples),
                        "The embeddings")


def audioDoc(task: str) -> dict[str, Any]:
    """/v1/audio/transcriptions and /translations: forwarded to the speech-to-text service, which answers."""
    ok = {"application/json": {"schema": anyOf((Transcription, VerboseTranscription))}, **textPlain(),
          "text/vtt": {"schema": {"type": "string"}},
          "text/event-stream": sseContent((TranscriptDelta, TranscriptDone, OpenAiError))}
    errors = (*OPENAI_MODEL_ERRORS, 415) if task == "transcribe" else (*OPENAI_MODEL_ERRORS, 415, 501)
    return operationDoc(ok, errors, OpenAiError, multipartOf(TranscriptionForm),
                        "json/verbose_json, text/srt (text/plain), vtt, or SSE events with stream")


# ------------------------------------------------------------------------------------------------ the document


def _withoutNull(field: dict[str, Any]) -> dict[str, Any]:
    """A form field's schema without its null branch: a form cannot carry null, a field is left out instead."""
    branches = [branch for branch in field.get("anyOf", ()) if branch.get("type") != "null"]
    if not branches:
        return field
    rest = {key: value for key, value in field.items() if key not in ("anyOf", "default")}
    return {**rest, **branches[0]} if len(branches) == 1 else {**rest, "anyOf": branches}


def wireSchemas() -> dict[str, Any]:
    """The JSON Schemas of every documented model (and the models they use), keyed by name."""
    _, schemas = models_json_schema([(model, "validation") for model in DOCUMENTED_MODELS],
                                    ref_template=REF_PREFIX + "{model}")
    definitions = schemas.get("$defs", {})
    for model in FORM_MODELS:
        form = definitions[model.__name__]
        form["properties"] = {name: _withoutNull(field) for name, field in form["properties"].items()}
    return definitions


def _keyClassOf(path: str) -> str | None:
    return next((keyClass for prefix, keyClass in KEY_CLASS_BY_PREFIX if path.startswith(prefix)), None)


def _dropFastApiValidationErrors(document: dict[str, Any]) -> None:
    """FastAPI adds a 422 HTTPValidationError to routes with parameters; this service answers validation errors
    with 400 in its own envelope, so the 422 is removed where the route does not document one itself."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            described = operation.get("responses", {}).get("422", {})
            schema = described.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref", "").endswith("/HTTPValidationError"):
                del operation["responses"]["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def buildOpenApi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, plus the wire schemas and the key each route needs."""
    document = get_openapi(title=app.title, version=app.version, description=__doc__.split("\n\n")[0],
                           routes=app.routes)
    _dropFastApiValidationErrors(document)
    components = document.setdefault("components", {})
    components["schemas"] = {**components.get("schemas", {}), **wireSchemas()}
    components["securitySchemes"] = dict(SECURITY_SCHEMES.values())
    for path, operations in document["paths"].items():
        keyClass = _keyClassOf(path)
        for operation in operations.values():
            if keyClass is not None:
                operation["security"] = [{SECURITY_SCHEMES[keyClass][0]: []}]
    return document


def installOpenApi(app: FastAPI) -> None:
    """``app.openapi()`` returns the full document, built once on first use (it is not served over HTTP)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = buildOpenApi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
