"""The OpenAPI document of the main service: the wire schemas of every API (next to each API) and the
OpenAPI document built from them (``installOpenApi``).

The handlers read raw requests on the hot path and validate by hand (``openaiCompat``, ``whisperServer``) or
with the field models of ``analysisRequest``, which are reused here as they are. The other models below only
describe: they are attached to the routes with ``openapi_extra`` (request bodies) and ``responses`` (every status a
route really returns, with OpenAI's error envelope on ``/v1/*`` and ``{detail, code, requestId}`` elsewhere).
Streams are described per item (``itemSchema``: one SSE event or one NDJSON line). ``tests/test_openApiSchemas.py``
checks real responses against the document, ``tests/test_openApiFuzz.py`` fuzzes the service with it.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from core.wire import REF_PREFIX, ApiError, OpenAiError
from documents.analysisRequest import AnalyzeJsonBody, EmbedBody, TextBody
from documents.wireSchemas import (
    ANALYZE_EVENTS,
    TEXT_EVENTS,
    Analysis,
    AnalyzeForm,
    ApiModelList,
    Embeddings,
    Preview,
    PreviewForm,
    TextAnswer,
)
from guard.security import KEY_CLASS_API, KEY_CLASS_BY_PREFIX, KEY_CLASS_OPENAI, requireAnyKey
from observe.healthSchemas import Health, NotReady, Ready
from openaiCompat.wireSchemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ModelList,
    ModelObject,
    ResponsesShapedRequest,
)
from speech.wireSchemas import TranscriptDelta, TranscriptDone, Transcription, TranscriptionForm, VerboseTranscription

SECURITY_SCHEMES = {
    KEY_CLASS_API: ("ApiKeyAuth", {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                   "description": "An analysis key ([auth] api_keys); /api/* only"}),
    KEY_CLASS_OPENAI: ("BearerAuth", {"type": "http", "scheme": "bearer",
                                      "description": "An OpenAI key ([auth] openai_keys); /v1/* only"}),
}
FORM_MODELS: tuple[type[BaseModel], ...] = (AnalyzeForm, PreviewForm, TranscriptionForm)
"""Bodies sent as multipart/form-data."""
DOCUMENTED_MODELS: tuple[type[BaseModel], ...] = (
    OpenAiError, ApiError, Health, Ready, NotReady, ApiModelList, AnalyzeForm, AnalyzeJsonBody, PreviewForm,
    Preview, Analysis, TextBody, TextAnswer, EmbedBody, Embeddings, *ANALYZE_EVENTS, *TEXT_EVENTS, ModelObject,
    ModelList, ChatCompletionRequest, ResponsesShapedRequest, ChatCompletion, ChatCompletionChunk, EmbeddingRequest,
    EmbeddingList, TranscriptionForm, Transcription, VerboseTranscription, TranscriptDelta, TranscriptDone,
)


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
    """``app.openapi()`` returns the full document, built once on first use; ``GET /openapi.json`` serves it to
    callers with a key of either class (so the gateway plugin's authors can generate a client from it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = buildOpenApi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.include_router(router)


router = APIRouter(include_in_schema=False)


@router.get("/openapi.json", dependencies=[Depends(requireAnyKey)])
async def openApiDocument(request: Request) -> Response:
    return Response(orjson.dumps(request.app.openapi()), media_type="application/json",
                    headers={"Cache-Control": "no-store"})
