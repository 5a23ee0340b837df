"""End to end: the real service process in front of the Ollama stub (discovery, cloud exclusion, Ollama down)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import API_KEY, OPENAI_KEY, REPO_ROOT, freePort, guardedEnv, waitForHttp
from tests.documentSamples import makeImage, makePdf
from tests.ollamaStub import StubServer

pytestmark = pytest.mark.e2e
BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}


def offeredModels(baseUrl: str) -> list[str]:
    response = httpx.get(baseUrl + "/v1/models", headers=BEARER)
    assert response.status_code == 200
    return [model["id"] for model in response.json()["data"]]


def waitUntil(predicate, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def test_offers_exactly_the_pulled_models_and_picks_up_a_pull(serviceFactory) -> None:
    with StubServer(models=["qwen2.5:7b"]) as stub:
        service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
                                  "PRIVATE_LLM_OLLAMA__DISCOVERY_TTL": "1"})
        assert offeredModels(service.baseUrl) == ["poweron-text-general"]
        httpx.post(stub.url("/_stub/pull"), json={"name": "nomic-embed-text"}).raise_for_status()
        waited = waitUntil(lambda: "poweron-embed" in offeredModels(service.baseUrl), timeout=5)
        assert waited <= 2.5  # within the 1 s TTL plus one refresh
        assert sorted(offeredModels(service.baseUrl)) == ["poweron-embed", "poweron-text-general"]
        health = httpx.get(service.baseUrl + "/health", headers={"X-API-Key": API_KEY}).json()
        assert health["status"] == "ok" and health["ollama"]["version"] == "0.33.0"


def test_cloud_model_is_never_offered_even_when_mapped(serviceFactory) -> None:
    with StubServer(models=["qwen2.5:7b", "qwen3-coder:480b-cloud", "gpt-oss:cloud"]) as stub:
        models = orjson.dumps({"poweron-text-reasoning": "qwen3-coder:480b-cloud",
                               "poweron-cloudy": "ollama=gpt-oss:cloud; type=text"}).decode()
        service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl, "PRIVATE_LLM_MODELS": models})
        tags = httpx.get(stub.url("/api/tags")).json()["models"]
        assert {entry["name"] for entry in tags} >= {"qwen3-coder:480b-cloud", "gpt-oss:cloud"}
        assert offeredModels(service.baseUrl) == ["poweron-text-general"]
        refused = httpx.get(service.baseUrl + "/v1/models/poweron-cloudy", headers=BEARER)
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "model_not_found"


def test_caller_host_header_is_not_forwarded(serviceFactory) -> None:
    with StubServer(models=["qwen2.5:7b"]) as stub:
        service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl})
        httpx.delete(stub.url("/_stub/requests"))
        httpx.post(service.baseUrl + "/v1/chat/completions", headers={**BEARER, "Host": "evil.example.com"},
                   json={"model": "poweron-text-general", "messages": [{"role": "user", "content": "hi"}]})
        chats = httpx.get(stub.url("/_stub/requests"), params={"path": "/api/chat"}).json()["requests"]
        assert chats, "the chat request did not reach the stub"
        assert all(request["headers"]["host"] == f"127.0.0.1:{stub.port}" for request in chats)


MODEL_BACKED_CALLS = [
    ("POST", "/v1/chat/completions", BEARER, {"json": {"model": "poweron-text-general",
                                                       "messages": [{"role": "user", "content": "hi"}]}}),
    ("POST", "/v1/chat/completions", BEARER, {"json": {"model": "poweron-text-general", "stream": True,
                                                       "messages": [{"role": "user", "content": "hi"}]}}),
    ("POST", "/v1/embeddings", BEARER, {"json": {"model": "poweron-embed", "input": "hi"}}),
    ("POST", "/api/text", {"X-API-Key": API_KEY}, {"json": {"prompt": "Summarise", "text": "hi"}}),
    ("POST", "/api/embed", {"X-API-Key": API_KEY}, {"json": {"texts": ["hi"]}}),
    ("POST", "/api/analyze", {"X-API-Key": API_KEY}, {"files": {"file": ("tiny.png", makeImage(8, 8), "image/png")},
                                                      "data": {"prompt": "What is this?"}}),
    ("POST", "/api/analyze", {"X-API-Key": API_KEY}, {"files": {"file": ("one.pdf", makePdf(1), "application/pdf")},
                                                      "data": {"prompt": "What is this?", "pages": "1-"}}),
]


def test_without_ollama_starts_degraded_and_model_calls_fail_fast(serviceFactory) -> None:
    service = serviceFactory()
    health = httpx.get(service.baseUrl + "/health", headers={"X-API-Key": API_KEY}).json()
    assert health["status"] == "degraded" and "not reachable" in health["ollama"]["reason"]
    assert httpx.get(service.baseUrl + "/health/readiness").status_code == 503
    with httpx.Client(base_url=service.baseUrl, timeout=5) as client:
        for method, path, headers, kwargs in MODEL_BACKED_CALLS:
            started = time.perf_counter()
            response = client.request(method, path, headers=headers, **kwargs)
            elapsed = time.perf_counter() - started
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert "not reachable" in response.text, (path, response.text)
            assert elapsed < 0.5, (path, elapsed)


def test_make_run_serves_health_on_the_configured_port(testIni: Path) -> None:
    port = freePort()
    env = {**os.environ, "PRIVATE_LLM_CONFIG": str(testIni), "PRIVATE_LLM_SERVER__PORT": str(port),
           "PRIVATE_LLM_WHISPER__ENABLED": "false"}
    process = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        waitForHttp(f"http://127.0.0.1:{port}/health", timeout=60, process=process)
        response = httpx.get(f"http://127.0.0.1:{port}/health")
        assert response.status_code == 200 and response.json()["status"] in ("ok", "degraded")
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)


def test_the_stub_runs_on_its_own_as_a_module() -> None:
    port = freePort()
    process = subprocess.Popen([sys.executable, "-m", "tests.ollamaStub", "--port", str(port), "--models",
                                "qwen2.5:7b,nomic-embed-text", "--no-record"], cwd=REPO_ROOT,
                               env=guardedEnv(dict(os.environ)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        waitForHttp(f"http://127.0.0.1:{port}/api/version", timeout=20, process=process)
        names = {entry["name"] for entry in httpx.get(f"http://127.0.0.1:{port}/api/tags").json()["models"]}
        answer = httpx.post(f"http://127.0.0.1:{port}/api/chat", json={
            "model": "qwen2.5:7b", "stream": False, "messages": [{"role": "user", "content": "ping"}]}).json()
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0].decode()
    assert names == {"qwen2.5:7b", "nomic-embed-text:latest"}
    assert answer["done"] is True and "ping" in answer["message"]["content"]
    assert f"listening on http://127.0.0.1:{port}" in output
