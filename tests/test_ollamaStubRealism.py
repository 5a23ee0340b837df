"""The stub's version-dependent behaviours, each checked against the Ollama source location it follows
(tests/stubRealism.py; reference ollama-api.md §12)."""

from __future__ import annotations

import base64
import io
import math

import orjson
import pytest
from PIL import Image

from tests.stubRealism import BAD_SCHEMA, IMAGE_FAILED, INPUT_TOO_LONG, QWEN25VL_PIXELS_NEW, QWEN25VL_PIXELS_OLD


@pytest.fixture
def client(stubControl):
    """The stub (conftest's, one per module), reset, through a client."""
    return stubControl


def words(count: int) -> str:
    return " ".join(["word"] * count)


def chat(messages, model="qwen2.5:7b", numCtx=2048, **extra):
    return {"model": model, "messages": messages, "stream": False, "options": {"num_ctx": numCtx}, **extra}


def imageBase64(width: int, height: int, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_overlongChatIsCutSilentlyOldestMessagesFirst(client):
    """server/prompt.go chatPrompt: system kept, oldest dropped until it fits; done_reason stays "stop"."""
    messages = [{"role": "system", "content": words(100)}, {"role": "user", "content": words(1500)},
                {"role": "assistant", "content": words(300)}, {"role": "user", "content": words(400)}]
    answer = client.post("/api/chat", json=chat(messages)).json()
    assert answer["done_reason"] == "stop" and answer["prompt_eval_count"] == 800
    entry = client.get("/_stub/requests", params={"path": "/api/chat"}).json()["requests"][-1]
    assert entry["truncated"] == {"promptTokens": 2300, "keptTokens": 800, "droppedMessages": 1, "numCtx": 2048}


def test_truncateFalseRefusesFrom0126(client):
    """commit 6544e1473 (v0.12.6): truncate:false -> 400 "the input length exceeds the context length"."""
    body = chat([{"role": "user", "content": words(3000)}], truncate=False)
    refused = client.post("/api/chat", json=body)
    assert (refused.status_code, refused.json()) == (400, {"error": INPUT_TOO_LONG})
    client.post("/_stub/config", json={"version": "0.12.5"})
    assert client.post("/api/chat", json=body).status_code == 200  # the field is unknown there: cut silently


def test_loopRunsToNumPredictOrTenTimesTheWindow(client):
    """llm/server.go ~1429: without num_predict a generation may run to 10 x num_ctx."""
    bounded = chat([{"role": "user", "content": "[[loop]]"}])
    bounded["options"]["num_predict"] = 50
    answer = client.post("/api/chat", json=bounded).json()
    assert (answer["eval_count"], answer["done_reason"]) == (50, "length")
    unbounded = client.post("/api/chat", json=chat([{"role": "user", "content": "[[loop]]"}])).json()
    assert unbounded["eval_count"] == 4000 and unbounded["done_reason"] == "length"  # capped by the stub


def test_thinkingByVersion(client):
    """commit 90d429f5a (v0.12.4): think defaults on; before it the trace is inline in content."""
    ask = [{"role": "user", "content": "why"}]
    split = client.post("/api/chat", json=chat(ask, model="deepseek-r1:70b")).json()["message"]
    assert split["thinking"] and "<think>" not in split["content"]
    client.post("/_stub/config", json={"version": "0.12.3"})
    inline = client.post("/api/chat", json=chat(ask, model="deepseek-r1:70b")).json()["message"]
    assert "thinking" not in inline and inline["content"].startswith("<think>") and "</think>" in inline["content"]
    leak = client.post("/api/chat", json=chat(ask, model="deepseek-r1:70b", think=False)).json()["message"]
    assert "</think>" in leak["content"] and not leak["content"].startswith("<think>")  # ollama#10964


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "[0-9]+"}}},
    {"type": "object", "properties": {"note": {"description": "no type"}}},
])
def test_schemasTheGrammarConverterRejectsAre500Before030(client, schema):
    """json-schema-to-grammar.cpp ~342 (unanchored pattern), ~949 (Unrecognized schema); llm/server.go ~1418."""
    body = chat([{"role": "user", "content": "hi"}], format=schema)
    assert client.post("/api/chat", json=body).status_code == 200
    client.post("/_stub/config", json={"version": "0.12.10"})
    failed = client.post("/api/chat", json=body)
    assert (failed.status_code, failed.json()) == (500, {"error": BAD_SCHEMA})


@pytest.mark.parametrize("version, model, refused", [
    ("0.12.10", "granite3.2-vision:latest", True), ("0.12.10", "qwen2.5vl:7b", False),
    ("0.31.0", "qwen2.5vl:7b", True), ("0.32.14", "granite3.2-vision:latest", False),
])
def test_webpByVersionAndModel(client, version, model, refused):
    """llama/llama.go ~509 (llama.cpp loader without WebP); commit f427fa075 (v0.32.14 transcodes)."""
    client.post("/_stub/config", json={"version": version})
    body = chat([{"role": "user", "content": "read", "images": [imageBase64(64, 64, "WEBP")]}], model=model)
    answer = client.post("/api/chat", json=body)
    assert (answer.status_code, answer.json().get("error")) == ((500, IMAGE_FAILED) if refused else (200, None))


def test_qwen25vlImageTokensFollowTheVersionPixelBudget(client):
    """model/models/qwen25vl/process_image.go: 28*28*1280 px before v0.13.4, 2<<20 from (commit 971d62595)."""
    image = imageBase64(2000, 1500)  # 3.0 MP
    body = chat([{"role": "user", "content": "read", "images": [image]}], model="qwen2.5vl:7b", numCtx=8192)
    new = client.post("/api/chat", json=body).json()["prompt_eval_count"]
    client.post("/_stub/config", json={"version": "0.13.3"})
    old = client.post("/api/chat", json=body).json()["prompt_eval_count"]
    assert (new, old) == (1 + math.ceil(QWEN25VL_PIXELS_NEW / 784), 1 + math.ceil(QWEN25VL_PIXELS_OLD / 784))


def test_overlongEmbeddingInputsAreCutOrTheWholeCallFails(client):
    """server/routes.go EmbedHandler (v0.12.10, v0.15.6 embedWithRetry): cut to the window unless truncate:false."""
    body = {"model": "nomic-embed-text", "input": ["short text", words(3000)], "options": {"num_ctx": 2048}}
    assert client.post("/api/embed", json=body).status_code == 200
    entry = client.get("/_stub/requests", params={"path": "/api/embed"}).json()["requests"][-1]
    assert entry["truncatedInputs"] == [1]
    refused = client.post("/api/embed", json={**body, "truncate": False})
    assert refused.status_code == 400 and "context length" in refused.json()["error"]
    assert orjson.loads(refused.content)["error"] == INPUT_TOO_LONG  # the HEAD message (v0.33)
