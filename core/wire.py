"""Wire-model base classes, the two error envelopes, and the helpers that describe a route's request and
responses for the OpenAPI document. The API-specific schemas live next to their API (``documents``,
``openaiCompat``, ``speech`` and ``observe`` ``wireSchemas``/``healthSchemas``); ``apidoc`` builds the document."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

REF_PREFIX = "#/components/schemas/"
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
    503: "The upstream is unreachable or busy, the model's queue in the service is full or the wait for a slot ran "
         "out (queue_full, queue_timeout), or every render worker is busy; retry after Retry-After seconds",
    504: "The upstream did not answer in time",
}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "integer", "minimum": 0}}}

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
    contextWindow: int = omitted("413 context_length_exceeded, 400 input_too_long: the model's window in tokens")
    promptTokens: int = omitted("413 context_length_exceeded: the prompt's estimated tokens")
    answerTokens: int = omitted("413 context_length_exceeded: the answer budget (maxTokens or num_predict)")
    index: int = omitted("400 input_too_long: which text is too long")
    estimatedTokens: int = omitted("400 input_too_long: that text's estimated tokens")
    keyword: str = omitted("400 unsupported_schema: the schema keyword Ollama cannot constrain")
    location: str = omitted("400 unsupported_schema: where it is (JSON pointer)")


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
