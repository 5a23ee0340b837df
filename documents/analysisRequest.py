"""Reading analysis requests: the fields of /api/analyze, /api/text and /api/embed as pydantic models, an upload
read from multipart/form-data (kept in memory, never spooled to disk) or from JSON with a base64 file."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.formparsers import MultiPartException, MultiPartParser

from config import Settings
from core.errors import ServiceError
from core.offload import offloadOf
from guard.jsonBody import parseJsonBody
from guard.requestLimits import checkFileSize, describeBytes

DEFAULT_VISION_MODEL = "poweron-vision-general"
DEFAULT_TEXT_MODEL = "poweron-text-general"
DEFAULT_EMBED_MODEL = "poweron-embed"
MAX_PROMPT_CHARS = 100_000
MAX_TEXT_CHARS = 1_000_000
MAX_COMPLETION_TOKENS = 131_072
MAX_FIELD_BYTES = 1024 * 1024
MAX_FORM_FIELDS = 20
MAX_EMBED_TEXTS = 2048
StreamMode = bool | Literal["ndjson", "sse"]


class RequestFields(BaseModel):
    """Common base: unknown fields are refused, so a misspelt option is a 400, not silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AnalyzeFields(RequestFields):
    """Fields of /api/analyze besides the file."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str = DEFAULT_VISION_MODEL
    system: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    pages: str | None = Field(None, max_length=200)
    schema_: Any = Field(None, alias="schema")
    temperature: float | None = Field(None, ge=0, le=2)
    maxTokens: int | None = Field(None, ge=1, le=MAX_COMPLETION_TOKENS)
    password: str | None = Field(None, max_length=1024)
    stream: StreamMode = False


class AnalyzeJsonBody(AnalyzeFields):
    """/api/analyze as JSON: the file as base64 (a data: URL prefix is accepted)."""

    file: str = Field(min_length=1)
    filename: str | None = Field(None, max_length=1024)


class TextBody(RequestFields):
    """/api/text: an instruction and a text for a text model."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    text: str = Field("", max_length=MAX_TEXT_CHARS)
    model: str = DEFAULT_TEXT_MODEL
    system: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    schema_: Any = Field(None, alias="schema")
    temperature: float | None = Field(None, ge=0, le=2)
    maxTokens: int | None = Field(None, ge=1, le=MAX_COMPLETION_TOKENS)
    stream: StreamMode = False


class EmbedBody(RequestFields):
    """/api/embed: texts to vectors."""

    texts: list[str] = Field(min_length=1, max_length=MAX_EMBED_TEXTS)
    model: str = DEFAULT_EMBED_MODEL
    dimensions: int | None = Field(None, ge=1, le=16384)
    truncate: bool = False
    """False (default): a text longer than the model's window is refused with 400 naming its index; true: Ollama
    embeds only its beginning."""


def parseFields(modelClass: type[RequestFields], data: Any) -> Any:
    """Validate request fields; errors become the service's 400 with every problem named."""
    if not isinstance(data, dict):
        raise ServiceError(400, "The request body must be a JSON object", code="invalid_request")
    try:
        return modelClass.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False, include_url=False)) from None


async def readJsonBody(request: Request) -> Any:
    """The body parsed as JSON within [limits] (400 with the parser's reason when it is not)."""
    try:
        return await parseJsonBody(await request.body(), request.app.state.settings.limits, offloadOf(request))
    except ValueError as exc:
        raise ServiceError(400, f"The body is not valid JSON ({exc})", code="invalid_json") from None


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser with the upload kept in memory: the spool limit equals the file limit, and a
    file growing past the limit stops the parse (413) before its bytes are stored, so nothing goes to disk."""

    def __init__(self, request: Request, maxFileBytes: int) -> None:
        super().__init__(request.headers, request.stream(), max_files=1, max_fields=MAX_FORM_FIELDS,
                         max_part_size=MAX_FIELD_BYTES)
        self.spool_max_size = maxFileBytes
        self.maxFileBytes = maxFileBytes
        self.fileBytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self.fileBytes += end - start
            if self.fileBytes > self.maxFileBytes:
                limit = describeBytes(self.maxFileBytes)
                raise ServiceError(413, f"The uploaded file is larger than the limit of {limit} ([limits] "
                                   "max_file_bytes)", code="file_too_large", param="file")
        super().on_part_data(data, start, end)


async def _readForm(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes]:
    try:
        form = await InMemoryMultiPartParser(request, settings.limits.max_file_bytes).parse()
    except MultiPartException as exc:
        raise ServiceError(400, f"Malformed multipart form: {exc.message}", code="invalid_multipart") from None
    fields: dict[str, Any] = {}
    upload = None
    for name, value in form.multi_items():
        if name in fields or (name == "file" and upload is not None):
            raise ServiceError(400, f"Field '{name}' was sent more than once", code="invalid_request", param=name)
        if name == "file" and not isinstance(value, str):
            upload = value
        else:
            fields[name] = value
    if "file" in fields:
        raise ServiceError(400, "file must be sent as a file upload (a form part with a filename), e.g. "
                           "curl -F file=@invoice.pdf", code="invalid_request", param="file")
    if upload is None:
        raise ServiceError(400, "No file: send the document in the multipart field 'file'", code="missing_file",
                           param="file")
    data = upload.file.read()
    upload.file.close()
    return fields, data


def decodeBase64File(text: str, settings: Settings) -> bytes:
    """The bytes of a base64 file field; a ``data:...;base64,`` prefix is accepted, wrapped lines too."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ServiceError(400, "file: a data URL must be base64-encoded (data:<type>;base64,<data>)",
                               code="invalid_file", param="file")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ServiceError(400, "file: not valid base64", code="invalid_file", param="file") from None
    checkFileSize(len(data), settings, param="file")
    return data


async def readAnalyzeRequest(request: Request, settings: Settings) -> tuple[AnalyzeFields, bytes]:
    """The fields and file bytes of /api/analyze, from multipart/form-data or from JSON."""
    contentType = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if contentType == "multipart/form-data":
        fields, data = await _readForm(request, settings)
        return parseFields(AnalyzeFields, fields), data
    if contentType == "application/json":
        body = parseFields(AnalyzeJsonBody, await readJsonBody(request))
        return body, decodeBase64File(body.file, settings)
    raise ServiceError(415, "Send the document as multipart/form-data (field 'file') or as application/json with "
                       "the file in base64 (field 'file')", code="unsupported_media_type")
