"""The service on a stub that behaves like the real daemon (tests/stubScheduler.py, tests/stubRealism.py): one row
of issue 15's table per test — one context window per model (0 reloads under mixed load), no silent truncation,
bounded generation, thinking, schemas the grammar converter takes, PNG/JPEG only with version pixel budgets, and
embeddings that are never cut silently."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from PIL import Image

from app import createApp
from tests.conftest import API_KEY, OPENAI_KEY
from tests.ollamaStub import StubServer
from upstream.ollamaVersion import QWEN25VL_OLD_PIXELS

WARMUP = "poweron-text-general, poweron-vision-general, poweron-embed"


@pytest.fixture(scope="module")
def stub():
    with StubServer(loadDelayMs=50) as server:
        yield server


@pytest.fixture
def control(stub):
    with httpx.Client(base_url=stub.baseUrl, timeout=10.0) as http:
        http.post("/_stub/reset").raise_for_status()
        http.post("/_stub/config", json={"loadDelayMs": 50}).raise_for_status()
        yield http


class Service:
    def __init__(self, app, client: httpx.AsyncClient) -> None:
        self.app, self.http = app, client

    async def api(self, path: str, **kwargs) -> httpx.Response:
        return await self.http.post(path, headers={"X-API-Key": API_KEY}, **kwargs)

    async def v1(self, path: str, body: dict) -> httpx.Response:
        return await self.http.post(path, headers={"Authorization": f"Bearer {OPENAI_KEY}"}, json=body)


@pytest.fixture
def serviceFor(stub, makeSettings):
    async def factory(version: str | None = None, warmup: str = "", **ollama) -> AsyncIterator[Service]:
        if version is not None:
            httpx.post(stub.url("/_stub/config"), json={"version": version}).raise_for_status()
        settings = makeSettings(ollama={"base_url": stub.baseUrl, **ollama}, warmup={"models": warmup})
        app = createApp(settings)
        async with app.router.lifespan_context(app):
            if app.state.warmup.task is not None:
                await asyncio.wait_for(app.state.warmup.task, 30)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service",
                                         timeout=60.0) as client:
                yield Service(app, client)
    return factory


def pngBytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (240, 240, 240)).save(buffer, format=fmt)
    return buffer.getvalue()


def dataUrl(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def upstream(control: httpx.Client, path: str = "/api/chat") -> list[dict]:
    return control.get("/_stub/requests", params={"path": path}).json()["requests"]


def chatBody(model: str, content, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# ------------------------------------------------------------------------ row 1: one context window per model


async def test_mixedTrafficAfterTheWarmupCausesNoReload(serviceFor, control):
    """sched.go needsReload: every route and the warm-up send the model's one num_ctx, so nothing reloads."""
    async for service in serviceFor(warmup=WARMUP):
        assert control.get("/_stub/scheduler").json()["loads"] == 3
        image = dataUrl(pngBytes(800, 600), "image/png")
        # first alone: the first document starts the render workers (seconds on a busy machine)
        first = await service.api("/api/analyze", files={"file": ("a.png", pngBytes(640, 480), "image/png")},
                                  data={"prompt": "Read it"})
        assert first.status_code == 200, first.text
        calls = [
            service.v1("/v1/chat/completions", chatBody("poweron-text-general", "Hello")),
            service.v1("/v1/chat/completions", chatBody("poweron-text-general", "Stream", stream=True)),
            service.api("/api/text", json={"prompt": "Summarise", "text": "A short text."}),
            service.api("/api/analyze", files={"file": ("a.png", pngBytes(640, 480), "image/png")},
                        data={"prompt": "Read it"}),
            service.v1("/v1/chat/completions", chatBody("poweron-vision-general",
                                                        [{"type": "text", "text": "Read"},
                                                         {"type": "image_url", "image_url": {"url": image}}])),
            service.api("/api/embed", json={"texts": ["one", "two"]}),
            service.v1("/v1/embeddings", {"model": "poweron-embed", "input": ["three"]}),
        ]
        answers = await asyncio.gather(*calls)
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200] * len(calls), [a.text[:300] for a in answers if a.status_code != 200]
    scheduler = control.get("/_stub/scheduler").json()
    assert (scheduler["loads"], scheduler["reloads"]) == (3, 0)
    windows = {entry["name"]: entry["context_length"] for entry in control.get("/api/ps").json()["models"]}
    # [ollama] num_ctx 8192 for the chat models; nomic-embed-text's own context length (2048) caps it
    assert windows == {"qwen2.5:7b": 8192, "qwen2.5vl:7b": 8192, "nomic-embed-text:latest": 2048}


async def test_perModelNumCtxIsCappedByTheModelsOwnContextLength(serviceFor, control, makeSettings):
    settings = makeSettings(models={"poweron-text-general": "ollama=qwen2.5:7b; type=text; num_ctx=65536"})
    spec = settings.modelMapping["poweron-text-general"]
    assert spec.numCtx == 65536
    async for service in serviceFor(warmup="poweron-text-general"):
        resolved = await service.app.state.registry.resolve("poweron-embed")
        assert (resolved.contextLength, resolved.window) == (2048, 2048)


# ------------------------------------------------------------------------------ row 2: no silent truncation


async def test_overlongPromptsAreRefusedBeforeOllamaCutsThem(serviceFor, control):
    long = "word " * 12000  # ~60,000 characters: far over an 8192-token window
    async for service in serviceFor():
        v1 = await service.v1("/v1/chat/completions", chatBody("poweron-text-general", long))
        api = await service.api("/api/text", json={"prompt": "Summarise", "text": long})
    assert v1.status_code == 400 and v1.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in v1.json()["error"]["message"]
    assert api.status_code == 413
    body = api.json()
    assert body["code"] == "context_length_exceeded" and body["contextWindow"] == 8192
    assert body["promptTokens"] > 8192 and body["answerTokens"] == 2048
    assert upstream(control) == []  # Ollama never saw them
    assert control.get("/_stub/events", params={"type": "promptTruncated"}).json()["count"] == 0


async def test_truncateFalseMakesOllamaRefuseWhatTheEstimateLetThrough(serviceFor, control):
    """From v0.12.6 the service sends truncate:false; a prompt the estimate under-counts is Ollama's 400, mapped to
    context_length_exceeded, never a silently shortened prompt."""
    dense = "a " * 9000  # 18,000 characters estimated ~6,600 tokens; the stub counts 9,000 words
    async for service in serviceFor():
        refused = await service.v1("/v1/chat/completions", chatBody("poweron-text-general", dense))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert upstream(control)[-1]["body"]["truncate"] is False
    assert control.get("/_stub/events", params={"type": "promptTruncated"}).json()["count"] == 0


async def test_olderDaemonsGetNoTruncateField(serviceFor, control):
    async for service in serviceFor(version="0.12.5"):
        assert (await service.v1("/v1/chat/completions", chatBody("poweron-text-general", "hi"))).status_code == 200
    assert "truncate" not in upstream(control)[-1]["body"]


async def test_theEstimateCalibratesFromPromptEvalCount(serviceFor, control):
    text = "word " * 400
    async for service in serviceFor():
        tokens = service.app.state.registry.tokens
        for _ in range(3):
            await service.v1("/v1/chat/completions", chatBody("poweron-text-general", text))
        assert tokens.samples["qwen2.5:7b"] == 3
        assert tokens.ratio("qwen2.5:7b") > 4.0  # the stub counts one token per 5-character word


# ---------------------------------------------------------------------------------- row 3: bounded generation


async def test_apiTextAndAnalyzeAlwaysBoundTheAnswerAndReportLength(serviceFor, control):
    async for service in serviceFor(num_predict=40):
        text = await service.api("/api/text", json={"prompt": "[[loop]]", "text": "repeat"})
        analysis = await service.api("/api/analyze", files={"file": ("a.png", pngBytes(64, 64), "image/png")},
                                     data={"prompt": "[[loop]]"})
    sent = [entry["body"]["options"]["num_predict"] for entry in upstream(control)]
    assert sent == [40, 40]
    assert (text.json()["doneReason"], text.json()["usage"]["completionTokens"]) == ("length", 40)
    assert analysis.json()["doneReason"] == "length"


# ---------------------------------------------------------------------------------------- row 4: thinking


async def test_thinkIsSentExplicitlyAndALeakedTraceNeverReachesTheAnswer(serviceFor, control):
    async for service in serviceFor(version="0.12.3"):
        text = await service.api("/api/text", json={"model": "poweron-text-reasoning", "prompt": "Why?",
                                                    "schema": {"type": "object", "required": ["answer"],
                                                               "properties": {"answer": {"type": "string"}}}})
        leaked = await service.v1("/v1/chat/completions", chatBody("poweron-text-reasoning", "Why?",
                                                                   reasoning_effort="none"))
        streamed = await service.v1("/v1/chat/completions", chatBody("poweron-text-reasoning", "Why?",
                                                                     reasoning_effort="none", stream=True))
    assert upstream(control)[0]["body"]["think"] is True
    assert text.status_code == 200 and text.json()["answer"] == {"answer": "stub"}
    message = leaked.json()["choices"][0]["message"]
    assert "</think>" not in message["content"] and message["reasoning_content"].startswith("The user asks")
    deltas = [orjson.loads(line[6:])["choices"][0]["delta"] for line in streamed.text.splitlines()
              if line.startswith("data: {") and '"choices":[{' in line]
    content = "".join(delta.get("content") or "" for delta in deltas)
    assert "</think>" not in content and content.startswith("This is a deterministic reply")
    assert "".join(delta.get("reasoning_content") or "" for delta in deltas).startswith("The user asks")


# ------------------------------------------------------------------------------------------ row 5: schemas


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "properties": {"iban": {"type": "string", "pattern": "[A-Z]{2}[0-9]+"}}}, "pattern"),
    ({"type": "object", "properties": {"note": {"description": "free text"}}}, "type"),
])
async def test_schemasOllamaCannotConstrainAre400NamingTheKeyword(serviceFor, control, schema, keyword):
    async for service in serviceFor(version="0.12.10"):
        api = await service.api("/api/text", json={"prompt": "Extract", "text": "x", "schema": schema})
        v1 = await service.v1("/v1/chat/completions", chatBody(
            "poweron-text-general", "Extract", response_format={"type": "json_schema",
                                                                "json_schema": {"name": "x", "schema": schema}}))
    assert api.status_code == 400 and api.json()["keyword"] == keyword and f"`{keyword}`" in api.json()["detail"]
    assert v1.status_code == 400 and f"`{keyword}`" in v1.json()["error"]["message"]
    assert upstream(control) == []


# ------------------------------------------------------------------------------------------- row 6: images


async def test_webpIsSentAsPngSoEveryVersionCanDecodeIt(serviceFor, control):
    webp = dataUrl(pngBytes(320, 200, "WEBP"), "image/webp")
    async for service in serviceFor(version="0.12.10"):
        body = chatBody("poweron-vision-deep", [{"type": "text", "text": "Read"},
                                               {"type": "image_url", "image_url": {"url": webp}}])
        answer = await service.v1("/v1/chat/completions", body)
    assert answer.status_code == 200
    assert [image["format"] for image in upstream(control)[-1]["images"]] == ["PNG"]


@pytest.mark.parametrize("version, budget", [("0.13.3", QWEN25VL_OLD_PIXELS), ("0.13.4", 2_097_152)])
async def test_qwen25vlPagesAreRenderedForTheDaemonsPixelBudget(serviceFor, control, version, budget):
    async for service in serviceFor(version=version):
        answer = await service.api("/api/analyze", files={"file": ("big.png", pngBytes(3000, 2000), "image/png")},
                                   data={"prompt": "Read it"})
    assert answer.status_code == 200
    image = upstream(control)[-1]["images"][0]
    assert budget * 0.9 <= image["width"] * image["height"] <= budget


# --------------------------------------------------------------------------------------- row 7: embeddings


async def test_overlongEmbeddingInputsAreRefusedByIndexOrTruncatedOnRequest(serviceFor, control):
    chunk = "word " * 3000  # 15,000 characters: over nomic-embed-text's 2048-token window
    async for service in serviceFor():
        v1 = await service.v1("/v1/embeddings", {"model": "poweron-embed", "input": ["fine", chunk]})
        api = await service.api("/api/embed", json={"texts": ["fine", "also fine", chunk]})
        cut = await service.api("/api/embed", json={"texts": ["fine", chunk], "truncate": True})
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "input[1]"
    assert api.status_code == 400 and (api.json()["index"], api.json()["code"]) == (2, "input_too_long")
    assert cut.status_code == 200 and cut.json()["count"] == 2
    sent = upstream(control, "/api/embed")
    assert len(sent) == 1 and sent[0]["body"]["truncate"] is True and sent[0]["truncatedInputs"] == [1]
