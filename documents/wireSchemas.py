"""Wire schemas of the analysis API (/api/models, /api/analyze, /api/text, /api/embed, /api/preview)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from config import ModelType
from core.wire import (
    API_ERRORS_GET,
    API_MODEL_ERRORS,
    ApiError,
    WireModel,
    jsonOf,
    multipartOf,
    ndjsonContent,
    omitted,
    operationDoc,
    sseContent,
)
from documents.analysisRequest import AnalyzeFields, AnalyzeJsonBody, EmbedBody, TextBody

TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
"""A 1x1 PNG, base64 (the example document of /api/analyze)."""

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
