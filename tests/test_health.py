"""Health probes with Ollama down: the service starts, says why it is degraded, readiness is 503."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app import createApp
from tests.conftest import API_KEY


def test_service_starts_degraded_without_ollama(makeSettings) -> None:
    with TestClient(createApp(makeSettings())) as client:
        health = client.get("/health", headers={"X-API-Key": API_KEY})
        readiness = client.get("/health/readiness")
        liveliness = client.get("/health/liveliness")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded"
    assert body["ollama"] == {"reachable": False, "version": None,
                              "reason": "Ollama is not reachable"}
    assert body["models"]["available"] == 0
    assert readiness.status_code == 503 and readiness.json()["status"] == "unhealthy"
    assert liveliness.status_code == 200 and liveliness.text == "I'm alive!"


def test_health_never_shows_keys(makeSettings) -> None:
    settings = makeSettings()
    with TestClient(createApp(settings)) as client:
        text = client.get("/health").text + client.get("/health/readiness").text
    for key in [*settings.apiKeys.values(), *settings.openAiKeys.values()]:
        assert key not in text


def test_every_response_carries_a_request_id(makeSettings) -> None:
    with TestClient(createApp(makeSettings())) as client:
        generated = client.get("/health/liveliness").headers["x-request-id"]
        echoed = client.get("/health/liveliness", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        hostile = client.get("/health/liveliness", headers={"X-Request-ID": "a b\"<script>"}).headers["x-request-id"]
    assert len(generated) == 32 and echoed == "abc-123" and hostile not in ("a b\"<script>",) and len(hostile) == 32
