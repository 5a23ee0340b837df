"""GET /metrics: key-protected Prometheus text whose counters move with requests and whose labels carry metadata from
fixed sets only (no prompt, path, model name or key a client made up)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app import createApp
from core.requestContext import RequestMeta
from observe.metrics import NO_LABEL, UNMATCHED_ROUTE
from tests.conftest import API_KEY, OPENAI_KEY, OTHER_OPENAI_KEY
from tests.ollamaStub import StubServer

TEXT = "poweron-text-general"
CHAT_ROUTE = "/v1/chat/completions"
SECRET_PROMPT = "Rechnung von Erika Mustermann IBAN DE02120300000000202051 secret-prompt-7f3a"
MADE_UP_MODEL = "gpt-4o-made-up-model-91c2"
MADE_UP_PATH = "/v1/private-path-e81d"
API_HEADERS = {"X-API-Key": API_KEY}
OPENAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}


def parseMetrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Samples as {(name, frozenset(labels.items())): value}."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sampleValue(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer(models=["qwen2.5:7b", "nomic-embed-text"]) as server:
        yield server


@pytest.fixture
async def service(stub: StubServer, makeSettings) -> AsyncIterator[httpx.AsyncClient]:
    httpx.post(stub.url("/_stub/reset"))
    app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service") as client:
            yield client


async def scrape(client: httpx.AsyncClient, headers: dict[str, str] = API_HEADERS) -> dict:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parseMetrics(response.text)


async def chat(client: httpx.AsyncClient, stream: bool, content: str = "Hallo", model: str = TEXT) -> httpx.Response:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": content}]}
    return await client.post(CHAT_ROUTE, json=body, headers=OPENAI_HEADERS)


async def test_metricsNeedAKeyOfEitherClass(service):
    assert (await service.get("/metrics")).status_code == 401
    assert (await service.get("/metrics", headers={"X-API-Key": "not-a-valid-key-123456"})).status_code == 401
    assert (await service.get("/metrics", headers={"Authorization": "Bearer not-a-valid-key-1234"})).status_code == 401
    assert (await service.get("/metrics", headers=API_HEADERS)).status_code == 200
    assert (await service.get("/metrics", headers=OPENAI_HEADERS)).status_code == 200


async def test_chatRequestsMoveTheCountersHistogramsAndTokens(service):
    before = await scrape(service)
    assert (await chat(service, stream=False)).status_code == 200
    response = await chat(service, stream=True)
    assert response.status_code == 200 and "[DONE]" in response.text
    after = await scrape(service)

    labels = {"route": CHAT_ROUTE, "method": "POST", "model": TEXT, "status": "200"}
    assert sampleValue(after, "poweron_requests_total", **labels) == \
        sampleValue(before, "poweron_requests_total", **labels) + 2
    durationLabels = {"route": CHAT_ROUTE, "model": TEXT}
    assert sampleValue(after, "poweron_request_duration_seconds_count", **durationLabels) == \
        sampleValue(before, "poweron_request_duration_seconds_count", **durationLabels) + 2
    assert sampleValue(after, "poweron_upstream_duration_seconds_count", model=TEXT) == \
        sampleValue(before, "poweron_upstream_duration_seconds_count", model=TEXT) + 2
    assert sampleValue(after, "poweron_time_to_first_token_seconds_count", model=TEXT) == \
        sampleValue(before, "poweron_time_to_first_token_seconds_count", model=TEXT) + 1  # only the stream
    promptTokens = sampleValue(after, "poweron_prompt_tokens_total", model=TEXT, key="cursor")
    completionTokens = sampleValue(after, "poweron_completion_tokens_total", model=TEXT, key="cursor")
    assert promptTokens > sampleValue(before, "poweron_prompt_tokens_total", model=TEXT, key="cursor")
    assert completionTokens > sampleValue(before, "poweron_completion_tokens_total", model=TEXT, key="cursor")


async def test_routeLabelIsTheTemplateNotThePath(service):
    await service.get("/v1/models/poweron-text-general", headers=OPENAI_HEADERS)
    await service.get("/v1/models/some-other-name-5521", headers=OPENAI_HEADERS)
    samples = await scrape(service)
    route = "/v1/models/{modelId}"
    assert sampleValue(samples, "poweron_requests_total", route=route, method="GET", model=NO_LABEL,
                       status="200") == 1
    assert sampleValue(samples, "poweron_requests_total", route=route, method="GET", model=NO_LABEL,
                       status="404") == 1
    assert sampleValue(samples, "poweron_request_errors_total", route=route, code="model_not_found") == 1


async def test_noContentPathOrMadeUpNameInAnyLabel(service):
    assert (await chat(service, stream=True, content=SECRET_PROMPT)).status_code == 200
    assert (await chat(service, stream=False, content=SECRET_PROMPT, model=MADE_UP_MODEL)).status_code == 404
    assert (await service.get(MADE_UP_PATH, headers=OPENAI_HEADERS)).status_code == 404
    await service.get("/metrics", headers={"X-API-Key": "a-wrong-key-that-must-not-leak-42"})
    response = await service.get("/metrics", headers=API_HEADERS)
    text = response.text
    for secret in ("Erika", "IBAN", "secret-prompt", MADE_UP_MODEL, "private-path", API_KEY, OPENAI_KEY,
                   "must-not-leak"):
        assert secret not in text
    samples = parseMetrics(text)
    assert sampleValue(samples, "poweron_requests_total", route=CHAT_ROUTE, method="POST", model=NO_LABEL,
                       status="404") == 1
    assert sampleValue(samples, "poweron_requests_total", route=UNMATCHED_ROUTE, method="GET", model=NO_LABEL,
                       status="404") == 1
    labelValues = {value for (_, labels) in samples for _, value in labels}
    allowed = {"route", "method", "model", "status", "key", "code", "type", "backend", "upstream", "le", "generation"}
    assert {name for (_, labels) in samples for name, _ in labels} <= allowed
    assert all(len(value) < 64 for value in labelValues)


async def test_rateLimitRefusalsAreCountedPerKey(stub, makeSettings):
    settings = makeSettings(ollama={"base_url": stub.baseUrl},
                            ratelimit={"openai_burst": 1, "openai_requests_per_minute": 1})
    app = createApp(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service") as client:
            headers = {"Authorization": f"Bearer {OTHER_OPENAI_KEY}"}
            statuses = [(await client.get("/v1/models", headers=headers)).status_code for _ in range(3)]
            samples = await scrape(client)
    assert statuses == [200, 429, 429]
    assert sampleValue(samples, "poweron_rate_limited_total", route="/v1/models", key="kiva") == 2
    assert sampleValue(samples, "poweron_requests_total", route="/v1/models", method="GET", model=NO_LABEL,
                       status="429") == 2


async def test_modelAvailabilityAndUpstreamReachabilityAreReadAtScrapeTime(service, stub):
    samples = await scrape(service)
    assert sampleValue(samples, "poweron_model_available", model=TEXT, type="text", backend="ollama") == 1
    assert sampleValue(samples, "poweron_model_available", model="poweron-embed", type="embedding",
                       backend="ollama") == 1
    assert (("poweron_model_available", frozenset({"model": "poweron-vision-general", "type": "vision",
                                                   "backend": "ollama"}.items())) in samples)
    assert sampleValue(samples, "poweron_model_available", model="poweron-vision-general", type="vision",
                       backend="ollama") == 0
    assert sampleValue(samples, "poweron_upstream_reachable", upstream="ollama") == 1
    assert sampleValue(samples, "poweron_upstream_reachable", upstream="whisper") == 0


async def test_inFlightCountsTheScrapeItself(service):
    samples = await scrape(service)
    assert sampleValue(samples, "poweron_requests_in_flight") == 1


async def test_eachAppHasItsOwnRegistry(stub, makeSettings):
    settings = makeSettings(ollama={"base_url": stub.baseUrl})
    first, second = createApp(settings), createApp(settings)
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(first), base_url="http://a") as a, \
                httpx.AsyncClient(transport=httpx.ASGITransport(second), base_url="http://b") as b:
            for _ in range(3):
                await a.get("/health/liveliness")
            samplesA, samplesB = await scrape(a), await scrape(b)
    liveliness = {"route": "/health/liveliness", "method": "GET", "model": NO_LABEL, "status": "200"}
    assert sampleValue(samplesA, "poweron_requests_total", **liveliness) == 3
    assert sampleValue(samplesB, "poweron_requests_total", **liveliness) == 0


async def test_metricsCanBeSwitchedOff(stub, makeSettings):
    app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}, metrics={"enabled": False}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service") as client:
            assert (await client.get("/metrics", headers=API_HEADERS)).status_code == 404
    assert not hasattr(app.state, "metrics")


@pytest.mark.e2e
def scrapeUntilSettled(client: httpx.Client, timeout: float = 5.0) -> dict:
    """Scrape until only the scrape itself is in flight: the server finishes a stream's bookkeeping just after the
    client has read the last frame, so one immediate scrape could still count it."""
    deadline = time.monotonic() + timeout
    while True:
        samples = parseMetrics(client.get("/metrics", headers=API_HEADERS).text)
        if sampleValue(samples, "poweron_requests_in_flight") == 1 or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_inFlightGaugeSeesAnOpenStreamInTheRealProcess(stub, serviceFactory):
    httpx.post(stub.url("/_stub/reset"))
    httpx.post(stub.url("/_stub/config"), json={"chunks": 12, "chunkDelayMs": 250})
    try:
        service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl})
        deadline = time.monotonic() + 20
        while httpx.get(service.baseUrl + "/health/readiness").status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.05)
        body = {"model": TEXT, "stream": True, "messages": [{"role": "user", "content": "Hallo"}]}
        with httpx.Client(base_url=service.baseUrl, timeout=30) as client:
            with client.stream("POST", CHAT_ROUTE, json=body, headers=OPENAI_HEADERS) as response:
                lines = response.iter_lines()
                next(lines)  # the role frame: the stream is open
                during = parseMetrics(client.get("/metrics", headers=API_HEADERS).text)
                list(lines)
            after = scrapeUntilSettled(client)
    finally:
        httpx.post(stub.url("/_stub/reset"))
    assert sampleValue(during, "poweron_requests_in_flight") == 2  # the stream and the scrape
    assert sampleValue(after, "poweron_requests_in_flight") == 1
    assert sampleValue(after, "poweron_requests_total", route=CHAT_ROUTE, method="POST", model=TEXT,
                       status="200") == 1
    assert sampleValue(after, "poweron_time_to_first_token_seconds_count", model=TEXT) == 1


def test_observerKeepsLabelsToConfiguredNamesAndFixedSets(makeSettings):
    app = createApp(makeSettings())
    meta = RequestMeta(requestId="r1", method="BREW", path="/v1/private-path-e81d", status=200,
                       externalModel=MADE_UP_MODEL, keyName="someone-else", promptTokens=7, durationSeconds=0.1,
                       errorCode="Ollama said: Erika Mustermann")
    app.state.metrics.observe(meta)
    samples = parseMetrics(generate_latest(app.state.metrics.registry).decode())
    assert sampleValue(samples, "poweron_requests_total", route=UNMATCHED_ROUTE, method="other", model=NO_LABEL,
                       status="200") == 1
    assert sampleValue(samples, "poweron_prompt_tokens_total", model=NO_LABEL, key=NO_LABEL) == 7
    assert sampleValue(samples, "poweron_request_errors_total", route=UNMATCHED_ROUTE, code="other") == 1
