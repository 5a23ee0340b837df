"""The OpenAPI document (apidoc/openApi.py) against the real service: every answer below, from success bodies and
streams (each SSE event, each NDJSON line) to the error envelopes, must have a documented status and content type
and validate against the document's schema for it. The app runs in-process with the Ollama stub."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator

from app import createApp
from core import wire
from documents import wireSchemas
from routeWeb import PreviewFields
from tests.conftest import API_KEY, DEAD_OLLAMA_URL, OPENAI_KEY
from tests.documentSamples import makeImage, makePdf
from whisperServer.transcriptFormats import Transcript, TranscriptSegment, renderTranscript

TEXT, VISION, DEEP, REASONING, EMBED = ("poweron-text-general", "poweron-vision-general", "poweron-vision-deep",
                                        "poweron-text-reasoning", "poweron-embed")
API_HEADERS = {"X-API-Key": API_KEY}
OPENAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}
HELLO = {"model": TEXT, "messages": [{"role": "user", "content": "Hello"}]}
WEATHER_TOOL = {"type": "function", "function": {"name": "getWeather", "description": "Weather of a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
INVOICE_SCHEMA = {"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}
SMALL_BODY_LIMIT = 64 * 1024


class DocumentChecker:
    """Checks real responses against the operation the document describes for them."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: list[tuple[str, str, int, str]] = []

    def validate(self, schema: dict[str, Any], instance: Any, where: str) -> None:
        validator = Draft202012Validator({**schema, "components": self.document["components"]})
        problems = [f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message[:300]}"
                    for error in validator.iter_errors(instance)]
        assert not problems, f"{where} does not match the document:\n" + "\n".join(problems[:5])

    def check(self, method: str, path: str, response: httpx.Response) -> httpx.Response:
        operation = self.document["paths"][path][method.lower()]
        status = str(response.status_code)
        where = f"{method} {path} -> {status}"
        assert status in operation["responses"], f"{where} is not documented: {response.text[:300]}"
        mediaType = response.headers.get("content-type", "").split(";")[0].strip()
        content = operation["responses"][status].get("content", {})
        assert mediaType in content, f"{where}: content type {mediaType!r} is not documented ({sorted(content)})"
        described = content[mediaType]
        if mediaType == "application/json":
            self.validate(described["schema"], response.json(), where)
        elif mediaType == "application/x-ndjson":
            lines = [orjson.loads(line) for line in response.text.splitlines() if line.strip()]
            assert lines, f"{where}: empty stream"
            for index, line in enumerate(lines):
                self.validate(described["itemSchema"], line, f"{where} line {index}")
        elif mediaType == "text/event-stream":
            self.checkEvents(described["itemSchema"], response.text, where)
        self.checked.append((method, path, response.status_code, mediaType))
        return response

    def checkEvents(self, itemSchema: dict[str, Any], text: str, where: str) -> None:
        events = parseSse(text)
        assert events, f"{where}: no events"
        dataSchema = itemSchema["properties"]["data"]
        branches = dataSchema.get("anyOf", [dataSchema])
        jsonBranch = next(branch for branch in branches if "contentSchema" in branch)
        for index, event in enumerate(events):
            self.validate(itemSchema, event, f"{where} event {index}")
            try:
                data = orjson.loads(event["data"])
            except orjson.JSONDecodeError:
                assert any(branch.get("const") == event["data"] for branch in branches), f"{where}: {event}"
                continue
            self.validate(jsonBranch["contentSchema"], data, f"{where} event {index} data")


def parseSse(text: str) -> list[dict[str, str]]:
    """Events as {"event", "data"} (event defaults to "message", as a client reads them)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        if "data" in fields:
            events.append({"event": (fields.get("event") or ["message"])[0], "data": "\n".join(fields["data"])})
    return events


class Service:
    """The app in-process, a client and the document checker."""

    def __init__(self, app: Any, http: httpx.AsyncClient) -> None:
        self.app, self.http = app, http
        self.checker = DocumentChecker(app.openapi())

    async def call(self, method: str, path: str, template: str | None = None, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, path, **kwargs)
        return self.checker.check(method, template or path, response)


@contextlib.asynccontextmanager
async def openService(settings: Any) -> AsyncIterator[Service]:
    app = createApp(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service",
                                     timeout=60) as http:
            yield Service(app, http)


@pytest.fixture
async def service(stub: Any, stubControl: httpx.Client, makeSettings) -> AsyncIterator[Service]:
    settings = makeSettings(ollama={"base_url": stub.baseUrl}, whisper={"base_url": DEAD_OLLAMA_URL, "enabled": True},
                            limits={"max_body_bytes": SMALL_BODY_LIMIT})
    async with openService(settings) as opened:
        yield opened


# ------------------------------------------------------------------------------------------------ the document


def test_everyRouteDocumentsItsBodiesAndItsKey(makeSettings) -> None:
    document = createApp(makeSettings()).openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKeyAuth"] == {**schemes["ApiKeyAuth"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["BearerAuth"] == {**schemes["BearerAuth"], "type": "http", "scheme": "bearer"}
    operations = [(path, method, operation) for path, item in document["paths"].items()
                  for method, operation in item.items()]
    assert len(operations) == 15
    for path, method, operation in operations:
        expected = ([{"ApiKeyAuth": []}] if path.startswith("/api/") else
                    [{"BearerAuth": []}] if path.startswith("/v1/") else None)
        assert operation.get("security") == expected, path
        assert ("requestBody" in operation) == (method == "post"), path
        for status, response in operation["responses"].items():
            assert response.get("content"), f"{method} {path} {status} has no body description"
            for mediaType, described in response["content"].items():
                schema = described.get("schema", described.get("itemSchema"))
                assert schema, f"{method} {path} {status} {mediaType}: an empty schema describes nothing"
        errors = [int(status) for status in operation["responses"] if status != "200"]
        if path.startswith(("/api/", "/v1/")):
            assert {401, 429} <= set(errors), path
            envelope = wire.OpenAiError if path.startswith("/v1/") else wire.ApiError
            for status in errors:
                assert operation["responses"][str(status)]["content"]["application/json"]["schema"] == \
                    wire.ref(envelope), f"{path} {status}"
    assert "HTTPValidationError" not in document["components"]["schemas"], "validation errors are 400s here"


def test_documentIsServedToCallersWithAKeyOfEitherClassAndBuiltOnce(makeSettings) -> None:
    """/openapi.json needs a key of either class (401 without, with a wrong one, in the usual envelope); the docs
    page for people is /docs (self-hosted Swagger UI); there is no /redoc and no OAuth redirect page."""
    from fastapi.testclient import TestClient

    app = createApp(makeSettings())
    assert app.openapi() is app.openapi()
    with TestClient(app) as client:
        for headers in (API_HEADERS, OPENAI_HEADERS):
            answer = client.get("/openapi.json", headers=headers)
            assert answer.status_code == 200
            assert answer.json() == app.openapi()
            assert answer.headers["x-request-id"]
        for headers, code in (({}, "missing_api_key"), ({"X-API-Key": "not-a-key-of-this-service"}, "invalid_api_key"),
                              ({"Authorization": "Bearer not-a-key-of-this-service"}, "invalid_api_key")):
            refused = client.get("/openapi.json", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["code"] == code
            assert "X-API-Key" in refused.json()["detail"] and "Bearer" in refused.json()["detail"]
        for path in ("/redoc", "/docs/oauth2-redirect"):
            assert client.get(path).status_code == 404, path


def test_docsPageUsesOnlySelfHostedAssetsUnderTheStrictCsp(makeSettings) -> None:
    import re

    from fastapi.testclient import TestClient

    from routeWeb import CONTENT_SECURITY_POLICY

    with TestClient(createApp(makeSettings())) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert "/static/swagger-ui/swagger-ui-bundle.js" in assets and "/static/docs.js" in assets
        for asset in assets:
            assert asset.startswith("/"), f"{asset} is not served by the service"
            assert client.get(asset).status_code == 200, asset
        assert "<script>" not in page.text and "style=" not in page.text


def test_previewFormHasTheFieldsThePreviewRouteReads() -> None:
    assert set(wireSchemas.PreviewForm.model_fields) == set(PreviewFields.model_fields) | {"file"}
    for name, field in PreviewFields.model_fields.items():
        assert wireSchemas.PreviewForm.model_fields[name].metadata == field.metadata, name


# ------------------------------------------------------------------------------------------------ /v1


async def test_chatAnswersMatchTheDocument(service: Service) -> None:
    chat = "/v1/chat/completions"
    body = (await service.call("POST", chat, json=HELLO, headers=OPENAI_HEADERS)).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    streamed = await service.call("POST", chat, headers=OPENAI_HEADERS,
                                  json={**HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.text.endswith("data: [DONE]\n\n") and '"usage"' in streamed.text
    tools = (await service.call("POST", chat, json={**HELLO, "tools": [WEATHER_TOOL]}, headers=OPENAI_HEADERS)).json()
    assert tools["choices"][0]["finish_reason"] == "tool_calls"
    streamedTools = await service.call("POST", chat, json={**HELLO, "tools": [WEATHER_TOOL], "stream": True},
                                       headers=OPENAI_HEADERS)
    assert '"tool_calls"' in streamedTools.text
    thinking = (await service.call("POST", chat, json={**HELLO, "model": REASONING}, headers=OPENAI_HEADERS)).json()
    assert thinking["choices"][0]["message"]["reasoning_content"]
    streamedThinking = await service.call("POST", chat, json={**HELLO, "model": REASONING, "stream": True},
                                          headers=OPENAI_HEADERS)
    assert '"reasoning_content"' in streamedThinking.text
    responsesShaped = await service.call("POST", chat, json={"model": TEXT, "input": "Hi", "instructions": "Brief"},
                                         headers=OPENAI_HEADERS)
    assert responsesShaped.status_code == 200
    midStream = await service.call("POST", chat, headers=OPENAI_HEADERS, json={
        **HELLO, "stream": True, "messages": [{"role": "user", "content": "Hi [[midstream-error]]"}]})
    assert '"error"' in midStream.text and midStream.text.endswith("data: [DONE]\n\n")


async def test_openAiErrorsMatchTheDocument(service: Service) -> None:
    chat = "/v1/chat/completions"
    codes = [
        (await service.call("POST", chat, json={**HELLO, "temperature": 7}, headers=OPENAI_HEADERS)),
        (await service.call("POST", chat, content=b"{", headers=OPENAI_HEADERS)),
        (await service.call("POST", chat, json={**HELLO, "model": "gpt-4o"}, headers=OPENAI_HEADERS)),
        (await service.call("POST", chat, json=HELLO)),
        (await service.call("POST", chat, json=HELLO, headers={"X-API-Key": API_KEY})),
        (await service.call("POST", chat, content=b"x" * (SMALL_BODY_LIMIT + 1), headers=OPENAI_HEADERS)),
        (await service.call("POST", "/v1/embeddings", json={"model": EMBED, "input": []}, headers=OPENAI_HEADERS)),
        (await service.call("GET", "/v1/models/gpt-4o", "/v1/models/{modelId}", headers=OPENAI_HEADERS)),
    ]
    assert [response.status_code for response in codes] == [400, 400, 404, 401, 401, 413, 400, 404]


async def test_modelsAndEmbeddingsMatchTheDocument(service: Service) -> None:
    listed = (await service.call("GET", "/v1/models", headers=OPENAI_HEADERS)).json()
    assert TEXT in {model["id"] for model in listed["data"]}
    await service.call("GET", f"/v1/models/{TEXT}", "/v1/models/{modelId}", headers=OPENAI_HEADERS)
    floats = (await service.call("POST", "/v1/embeddings", json={"model": EMBED, "input": ["a", "b"]},
                                 headers=OPENAI_HEADERS)).json()
    assert len(floats["data"]) == 2 and isinstance(floats["data"][0]["embedding"], list)
    packed = (await service.call("POST", "/v1/embeddings", headers=OPENAI_HEADERS, json={
        "model": EMBED, "input": "a", "encoding_format": "base64", "dimensions": 64})).json()
    assert len(base64.b64decode(packed["data"][0]["embedding"])) == 64 * 4


async def test_rateLimitedAnswersMatchTheDocument(stub: Any, makeSettings) -> None:
    settings = makeSettings(ollama={"base_url": stub.baseUrl}, ratelimit={
        "api_burst": 1, "openai_burst": 1, "api_requests_per_minute": 1, "openai_requests_per_minute": 1})
    async with openService(settings) as service:
        for path, headers in (("/v1/models", OPENAI_HEADERS), ("/api/models", API_HEADERS)):
            await service.call("GET", path, headers=headers)
            refused = await service.call("GET", path, headers=headers)
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


# ------------------------------------------------------------------------------------------------ /api


async def test_textAndEmbedAnswersMatchTheDocument(service: Service, stubControl: httpx.Client) -> None:
    text = {"prompt": "Summarise", "text": "Invoice 17, total CHF 120."}
    assert (await service.call("POST", "/api/text", json=text, headers=API_HEADERS)).json()["format"] == "text"
    for stream, mediaType in (("ndjson", "application/x-ndjson"), ("sse", "text/event-stream")):
        streamed = await service.call("POST", "/api/text", json={**text, "stream": stream}, headers=API_HEADERS)
        assert streamed.headers["content-type"].startswith(mediaType)
    thinking = await service.call("POST", "/api/text", json={**text, "model": REASONING}, headers=API_HEADERS)
    assert thinking.json()["thinking"]
    structured = await service.call("POST", "/api/text", json={**text, "schema": INVOICE_SCHEMA},
                                    headers=API_HEADERS)
    assert structured.json()["format"] == "json"
    stubControl.post("/_stub/config", json={"badJsonCount": 2}).raise_for_status()
    mismatch = await service.call("POST", "/api/text", json={**text, "schema": INVOICE_SCHEMA}, headers=API_HEADERS)
    assert mismatch.status_code == 422 and mismatch.json()["rawAnswer"]
    midStream = await service.call("POST", "/api/text", headers=API_HEADERS,
                                   json={**text, "prompt": "Hi [[midstream-error]]", "stream": "ndjson"})
    assert '"type":"error"' in midStream.text
    vectors = await service.call("POST", "/api/embed", json={"texts": ["a", "b"]}, headers=API_HEADERS)
    assert vectors.json()["count"] == 2
    errors = [await service.call("POST", "/api/text", json={"prompt": ""}, headers=API_HEADERS),
              await service.call("POST", "/api/text", json={"prompt": "x", "model": "gpt-4o"}, headers=API_HEADERS),
              await service.call("POST", "/api/embed", json={"texts": ["a"], "model": TEXT}, headers=API_HEADERS),
              await service.call("POST", "/api/embed", json={"texts": ["a"]}),
              await service.call("GET", "/api/models", headers=OPENAI_HEADERS)]
    assert [response.status_code for response in errors] == [400, 404, 400, 401, 401]
    assert (await service.call("GET", "/api/models", headers=API_HEADERS)).json()["models"]


async def test_analyzeAndPreviewAnswersMatchTheDocument(service: Service) -> None:
    png = makeImage(40, 30, "PNG")
    form = {"prompt": "What is it?"}
    single = await service.call("POST", "/api/analyze", data=form, files={"file": ("a.png", png)},
                                headers=API_HEADERS)
    assert single.json()["mode"] == "single"
    asJson = await service.call("POST", "/api/analyze", headers=API_HEADERS,
                                json={**form, "file": base64.b64encode(png).decode()})
    assert asJson.status_code == 200
    pdf = makePdf(2)
    perPage = await service.call("POST", "/api/analyze", data={**form, "model": DEEP}, files={"file": ("a.pdf", pdf)},
                                 headers=API_HEADERS)
    assert perPage.json()["pageAnswers"]
    for stream in ("ndjson", "sse"):
        streamed = await service.call("POST", "/api/analyze", data={**form, "model": DEEP, "stream": stream},
                                      files={"file": ("a.pdf", pdf)}, headers=API_HEADERS)
        assert '"page"' in streamed.text
    preview = await service.call("POST", "/api/preview", files={"file": ("a.pdf", pdf)}, headers=API_HEADERS)
    assert len(preview.json()["thumbnails"]) == 2
    errors = [
        await service.call("POST", "/api/analyze", content=b"plain", headers={**API_HEADERS,
                                                                               "content-type": "text/plain"}),
        await service.call("POST", "/api/analyze", data=form, files={"file": ("a.zip", b"PK\x03\x04zip")},
                           headers=API_HEADERS),
        await service.call("POST", "/api/analyze", data={**form, "pages": "1-x"}, files={"file": ("a.pdf", pdf)},
                           headers=API_HEADERS),
        await service.call("POST", "/api/analyze", data=form, files={"file": ("a.pdf", pdf[:200])},
                           headers=API_HEADERS),
        await service.call("POST", "/api/preview", json={}, headers=API_HEADERS),
        await service.call("POST", "/api/preview", data={"model": "gpt-4o"}, files={"file": ("a.pdf", pdf)},
                           headers=API_HEADERS),
    ]
    assert [response.status_code for response in errors] == [415, 415, 400, 422, 415, 404]


# ------------------------------------------------------------------------------------------------ health, audio


async def test_healthAnswersMatchTheDocument(service: Service, makeSettings) -> None:
    assert (await service.call("GET", "/health")).json()["status"] == "ok"
    assert (await service.call("GET", "/health/readiness")).json()["status"] == "healthy"
    for path in ("/health/liveliness", "/health/liveness"):
        assert (await service.call("GET", path)).text == "I'm alive!"
    async with openService(makeSettings()) as down:  # the test INI points Ollama at a dead port
        assert (await down.call("GET", "/health")).json()["status"] == "degraded"
        assert (await down.call("GET", "/health/readiness")).status_code == 503
        unreachable = await down.call("POST", "/v1/chat/completions", json=HELLO, headers=OPENAI_HEADERS)
        assert unreachable.status_code == 503 and unreachable.headers["Retry-After"]
        assert (await down.call("POST", "/api/text", json={"prompt": "x"}, headers=API_HEADERS)).status_code == 503


async def test_audioErrorsMatchTheDocument(service: Service, makeSettings) -> None:
    upload = {"files": {"file": ("a.wav", b"RIFF....WAVE")}, "data": {"model": "whisper-1"}}
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        down = await service.call("POST", path, headers=OPENAI_HEADERS, **upload)
        assert down.status_code == 503 and down.json()["error"]["code"] == "upstream_unavailable"
        notMultipart = await service.call("POST", path, json={"model": "whisper-1"}, headers=OPENAI_HEADERS)
        assert notMultipart.status_code == 400
    async with openService(makeSettings()) as switchedOff:  # the test INI has [whisper] enabled = false
        off = await switchedOff.call("POST", "/v1/audio/transcriptions", headers=OPENAI_HEADERS, **upload)
        assert off.status_code == 404


def transcript(task: str) -> Transcript:
    segment = TranscriptSegment(id=0, seek=0, start=0.0, end=1.5, text=" Hello there.", tokens=[50364, 2425],
                                temperature=0.0, avg_logprob=-0.2, compression_ratio=1.1, no_speech_prob=0.01,
                                words=[{"word": " Hello", "start": 0.0, "end": 0.7}])
    return Transcript(task=task, language="en", duration=1.5, segments=[segment])


@pytest.mark.parametrize("task", ["transcribe", "translate"])
@pytest.mark.parametrize(("responseFormat", "withWords"), [("json", False), ("verbose_json", False),
                                                            ("verbose_json", True)])
def test_whisperJsonBodiesMatchTheDocument(makeSettings, task: str, responseFormat: str, withWords: bool) -> None:
    """The speech-to-text service's JSON answers (passed through unchanged) as transcriptFormats renders them."""
    document = createApp(makeSettings()).openapi()
    path = "/v1/audio/transcriptions" if task == "transcribe" else "/v1/audio/translations"
    schema = document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    body = orjson.loads(orjson.dumps(renderTranscript(transcript(task), responseFormat, withWords)))
    DocumentChecker(document).validate(schema, body, f"{task} {responseFormat}")
