"""Schemathesis against the service's own OpenAPI document (``app.openapi()``, built by apidoc/openApi.py).

The app runs in-process (schemathesis' ASGI transport, which runs the app's lifespan) with a healthy Ollama stub and
the speech-to-text service pointed at a port where nothing listens; the valid key of each security scheme is
injected by schemathesis from the document's security schemes. Every operation is fuzzed with schema-valid and
schema-violating requests; each response must be no server error (the only 5xx allowed is the documented 503 of
the audio routes while speech-to-text is unreachable), have a documented status and content type, and match its
schema. Bounded (examples per operation, fixed seed, no example database, 30 s per request): about 30 s here.

The schema is loaded at import (``schemathesis.pytest.from_fixture`` does not work with pytest 9.2: it sets
``node._nodeid``); the document does not depend on the settings, so it comes from an app with the test INI.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import createApp
from config import ENV_PREFIX, Settings, loadSettings
from tests.conftest import API_KEY, DEAD_OLLAMA_URL, OPENAI_KEY, TEST_INI

MAX_EXAMPLES = int(os.environ.get("POWERON_FUZZ_EXAMPLES", "50"))
SEED = int(os.environ.get("POWERON_FUZZ_SEED", "20240610"))
"""Fixed, so CI runs the same cases every time; a deeper local run: POWERON_FUZZ_EXAMPLES=500 POWERON_FUZZ_SEED=7."""
AUDIO_PREFIX = "/v1/audio/"
SPEECH_TO_TEXT_DOWN = 503
"""Documented for /v1/audio/* while the speech-to-text service is unreachable (as it is here)."""
GENEROUS_LIMITS = {"api_requests_per_minute": 1_000_000, "api_burst": 1_000_000,
                   "openai_requests_per_minute": 1_000_000, "openai_burst": 1_000_000,
                   "max_concurrent_per_key": 1000}
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_headers_conformance,
                 response_schema_conformance]


def serviceSettings(**overrides: Any) -> Settings:
    """Settings from the test INI, made without leaving anything in the environment."""
    with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ):
        for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
            del os.environ[name]
        path = Path(folder) / "config.ini"
        path.write_text(TEST_INI, encoding="utf-8")
        os.environ["PRIVATE_LLM_CONFIG"] = str(path)
        return loadSettings(**overrides)


CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "auth": {"openapi": {"ApiKeyAuth": {"api_key": API_KEY}, "BearerAuth": {"bearer": OPENAI_KEY}}},
})
schema = schemathesis.openapi.from_dict(createApp(serviceSettings()).openapi(), config=CONFIG)
"""The document does not depend on the settings; the app under test is built per module with the stub's URL."""


@pytest.fixture(scope="module")
def fuzzedApp(stub: Any) -> Iterator[FastAPI]:
    """The service with the stub as Ollama and an unreachable speech-to-text service; its lifespan is run by
    schemathesis' ASGI transport on the first call and ended here."""
    app = createApp(serviceSettings(ollama={"base_url": stub.baseUrl, "read_timeout": 10},
                                    whisper={"base_url": DEAD_OLLAMA_URL, "enabled": True},
                                    ratelimit=GENEROUS_LIMITS, documents={"render_timeout_seconds": 10}))
    yield app
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_everyOperationAnswersAsDocumented(case: schemathesis.Case, fuzzedApp: FastAPI) -> None:
    response = case.call(app=fuzzedApp, timeout=30)
    if case.path.startswith(AUDIO_PREFIX) and response.status_code == SPEECH_TO_TEXT_DOWN:
        assert response.json()["error"]["code"] == "upstream_unavailable"
        case.validate_response(response, checks=SCHEMA_CHECKS)
        return
    case.validate_response(response, checks=[not_a_server_error, *SCHEMA_CHECKS])
