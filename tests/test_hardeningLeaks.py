"""Issue 17, part A: every 5xx is a proper answer (X-Request-ID, an error code in the access line), deep JSON and
schemas are a 400, and nothing internal leaks to callers (Ollama's raw error text, internal URLs, versions, the
Ollama model behind a planned name, host-absolute redirects, re-encoded request ids, random tokens in comments)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app import createApp
from config import writeInitialConfig
from observe.accessLog import ACCESS_LOGGER
from tests.conftest import API_KEY, DEAD_OLLAMA_URL, OPENAI_KEY
from upstream.ollamaClient import mapStatusError, midStreamError

BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
API = {"X-API-Key": API_KEY}
BLOB_PATH = "/usr/share/ollama/.ollama/models/blobs/sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de"
HELLO = [{"role": "user", "content": "Hallo"}]


async def openClient(settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = createApp(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://testserver") as http:
        http.app = app  # type: ignore[attr-defined]
        yield http


@pytest.fixture
async def client(makeSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The service with Ollama and whisper down."""
    async for http in openClient(makeSettings()):
        yield http


@pytest.fixture
async def stubClient(stub, stubControl, makeSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The service with the Ollama stub up."""
    async for http in openClient(makeSettings(ollama={"base_url": stub.baseUrl})):
        yield http


def accessLines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]


def nestedSchema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"inner": schema}}
    return schema


# ------------------------------------------------------------------------------ every 5xx is a proper answer


async def test_unexpected_error_is_500_with_request_id_and_error_code(client, caplog) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)

    async def broken() -> None:
        raise RuntimeError("a bug")

    client.app.add_api_route("/broken", broken)
    openAiStyle = "/v1/broken"
    client.app.add_api_route(openAiStyle, broken)
    response = await client.get("/broken")
    v1 = await client.get(openAiStyle, headers=BEARER)
    assert response.status_code == 500 and v1.status_code == 500
    assert len(response.headers["x-request-id"]) == 32
    assert response.json()["code"] == "internal_error"
    assert response.json()["requestId"] == response.headers["x-request-id"]
    assert v1.json()["error"]["code"] == "internal_error" and "x-request-id" in v1.headers
    assert "a bug" not in response.text
    lines = [line for line in accessLines(caplog) if line["status"] == 500]
    assert len(lines) == 2 and all(line["error"] == "internal_error" for line in lines)


async def test_every_5xx_access_line_names_an_error(client, caplog) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    readiness = await client.get("/health/readiness")
    assert readiness.status_code == 503 and "x-request-id" in readiness.headers
    line = next(line for line in accessLines(caplog) if line["path"] == "/health/readiness")
    assert line["status"] == 503 and line["error"]


# ------------------------------------------------------------------------------ deep JSON and schemas


async def test_deep_schema_is_400_on_api_text(client) -> None:
    body = {"model": "poweron-text-general", "prompt": "x", "text": "y", "schema": nestedSchema(100)}
    response = await client.post("/api/text", headers=API, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] in ("invalid_schema", "json_too_deep")
    assert "nested" in response.json()["detail"]


async def test_schema_depth_limit_is_a_400_below_the_body_limit(client) -> None:
    body = {"model": "poweron-text-general", "prompt": "x", "text": "y", "schema": nestedSchema(40)}
    response = await client.post("/api/text", headers=API, json=body)
    assert response.status_code == 400 and response.json()["code"] == "invalid_schema"
    assert "nested deeper than" in response.json()["detail"]


async def test_deep_schema_is_400_on_v1_response_format(stubClient) -> None:
    for levels in (40, 100):
        body = {"model": "poweron-text-general", "messages": HELLO,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": nestedSchema(levels)}}}
        response = await stubClient.post("/v1/chat/completions", headers=BEARER, json=body)
        assert response.status_code == 400, response.text
        assert "nested" in response.json()["error"]["message"]


async def test_deep_tool_parameters_are_400_not_500(stubClient) -> None:
    deep: Any = {"type": "string"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    body = {"model": "poweron-text-general", "messages": HELLO, "tools": [tool]}
    response = await stubClient.post("/v1/chat/completions", headers=BEARER, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "json_too_deep"


async def test_wide_schema_is_400(client) -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(12_000)}}
    body = {"model": "poweron-text-general", "prompt": "x", "text": "y", "schema": schema}
    response = await client.post("/api/text", headers=API, json=body)
    assert response.status_code == 400 and response.json()["code"] == "invalid_schema"


# ------------------------------------------------------------------------------ Ollama's raw error text


@pytest.mark.parametrize("status", [400, 500, 503])
def test_ollama_error_text_is_not_passed_on(status: int, caplog) -> None:
    caplog.set_level(logging.WARNING)
    raw = f"llama runner process has terminated: error loading model {BLOB_PATH} (qwen2.5:7b-internal)"
    error = mapStatusError(status, orjson.dumps({"error": raw}), "poweron-text-general")
    assert "blobs" not in error.message and "/usr/share" not in error.message
    assert "qwen2.5:7b-internal" not in error.message
    assert status == 503 or "poweron-text-general" in error.message
    assert any(BLOB_PATH in record.getMessage() for record in caplog.records)


def test_known_ollama_errors_map_to_our_messages() -> None:
    tools = mapStatusError(400, orjson.dumps({"error": "registry.ollama.ai/library/gemma:2b does not support tools"}),
                           "poweron-text-general")
    assert tools.status == 400 and "does not support tools" in tools.message and "registry" not in tools.message
    context = mapStatusError(400, orjson.dumps({"error": "the input length exceeds the context length"}), "m")
    assert "context" in context.message


def test_midstream_error_text_is_not_passed_on(caplog) -> None:
    caplog.set_level(logging.WARNING)
    error = midStreamError(f"failed to read {BLOB_PATH}: unexpected EOF")
    assert "blobs" not in error.message and error.code == "upstream_stream_error"
    assert any(BLOB_PATH in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------ health and internal URLs


async def test_public_health_says_reachable_only(client) -> None:
    health = (await client.get("/health")).json()
    readiness = (await client.get("/health/readiness")).json()
    assert health == {"status": "degraded", "ollama": {"reachable": False},
                      "whisper": {"enabled": False, "reachable": False}}
    assert readiness == {"status": "unhealthy"}


async def test_public_health_of_a_healthy_service_shows_no_version(stubClient) -> None:
    health = await stubClient.get("/health")
    readiness = await stubClient.get("/health/readiness")
    assert health.json()["ollama"] == {"reachable": True} and "models" not in health.json()
    assert readiness.status_code == 200 and readiness.json() == {"status": "healthy"}
    assert "0.33.0" not in health.text + readiness.text


@pytest.mark.parametrize("headers", [API, BEARER])
async def test_health_with_a_key_of_either_class_shows_details(stubClient, headers) -> None:
    health = (await stubClient.get("/health", headers=headers)).json()
    readiness = (await stubClient.get("/health/readiness", headers=headers)).json()
    assert health["ollama"]["version"] == "0.33.0" and health["models"]["available"] > 0
    assert readiness["ollama_version"] == "0.33.0"


async def test_health_details_never_name_internal_urls(client) -> None:
    for headers in ({}, API):
        text = (await client.get("/health", headers=headers)).text + (
            await client.get("/health/readiness", headers=headers)).text
        assert "127.0.0.1" not in text and "http://" not in text


async def test_503s_do_not_name_internal_urls(makeSettings) -> None:
    settings = makeSettings(whisper={"enabled": True, "base_url": "http://127.0.0.1:9"})
    async for http in openClient(settings):
        audio = await http.post("/v1/audio/transcriptions", headers=BEARER,
                                files={"file": ("a.wav", b"RIFF0000", "audio/wav")}, data={"model": "whisper-1"})
        chat = await http.post("/v1/chat/completions", headers=BEARER,
                               json={"model": "poweron-text-general", "messages": HELLO})
    assert audio.status_code == 503 and chat.status_code == 503
    for response in (audio, chat):
        assert "127.0.0.1" not in response.text and DEAD_OLLAMA_URL not in response.text


# ------------------------------------------------------------------------------ redirects, model names, headers


@pytest.mark.parametrize("path, headers", [("/metrics/", API), ("/metrics/", {}), ("/api/models/", API),
                                           ("/v1/models/", BEARER)])
async def test_no_host_absolute_redirect(client, path: str, headers: dict) -> None:
    response = await client.get(path, headers={**headers, "Host": "evil.example"})
    location = response.headers.get("location", "")
    assert "evil.example" not in location and not location.startswith(("http:", "https:", "//"))


async def test_planned_model_404_names_the_ollama_model_only_in_the_log(stubClient, stubControl, caplog) -> None:
    caplog.set_level(logging.INFO)
    stubControl.post("/_stub/remove", json={"name": "deepseek-r1:70b"}).raise_for_status()
    await stubClient.app.state.registry.refresh()
    response = await stubClient.post("/api/text", headers=API, json={
        "model": "poweron-text-reasoning", "prompt": "x", "text": "y"})
    assert response.status_code == 404 and response.json()["code"] == "model_not_found"
    assert "deepseek" not in response.text and "ollama pull" not in response.text
    assert any("deepseek-r1:70b" in record.getMessage() for record in caplog.records)


async def test_bearer_with_a_tab_is_accepted(client) -> None:
    response = await client.get("/v1/models", headers={"Authorization": f"Bearer\t{OPENAI_KEY}"})
    assert response.status_code == 200


async def test_latin1_request_id_is_replaced_not_re_encoded(client) -> None:
    response = await client.get("/health/liveliness", headers=[(b"X-Request-ID", "abc\xe9def".encode("latin-1"))])
    requestId = response.headers["x-request-id"]
    assert requestId != "abc\xe9def" and requestId.isascii() and len(requestId) == 32


async def test_options_allow_lists_only_methods_a_route_has(client) -> None:
    for path in ("/api/models", "/v1/chat/completions"):
        allow = (await client.options(path)).headers["allow"]
        assert "DELETE" not in allow and "GET" in allow and "POST" in allow


def test_config_init_writes_no_token_into_a_comment(tmp_path: Path) -> None:
    target = tmp_path / "config.ini"
    names = writeInitialConfig(target)
    comments = [line for line in target.read_text().splitlines() if line.lstrip().startswith((";", "#"))]
    example = [line for line in (Path(__file__).parent.parent / "config.ini.example").read_text().splitlines()
               if line.lstrip().startswith((";", "#"))]
    assert comments == example
    assert all(not name.startswith((";", "#")) for name in names)
