"""Per-key token buckets and concurrency limits: exact admission counts, exact Retry-After (injectable clock),
429 shapes for the OpenAI SDK and the analysis API, slots held for the whole life of a stream."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from app import createApp
from config import ConfigError
from core.errors import ServiceError
from guard.rateLimit import RateLimiter, TokenBucket, keyLimitsFor, retryAfterSeconds
from guard.security import requireApiKey, requireOpenAiKey
from tests.conftest import API_KEY, OPENAI_KEY, OTHER_OPENAI_KEY
from tests.liveServer import liveServer, waitFor

BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _testRoutes(app: FastAPI) -> None:
    """A stream that stays open until app.state.release is set, an erroring route, and an /api route."""
    openAiRouter = APIRouter(prefix="/v1/_test")
    apiRouter = APIRouter(prefix="/api/_test")

    @openAiRouter.get("/hold")
    async def hold(request: Request) -> StreamingResponse:
        event: asyncio.Event = request.app.state.release

        async def body():
            yield b"started\n"
            await event.wait()
            yield b"finished\n"

        return StreamingResponse(body(), media_type="text/plain")

    @openAiRouter.get("/fail")
    async def fail() -> None:
        raise ServiceError(502, "upstream broke")

    @apiRouter.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    app.include_router(openAiRouter, dependencies=[Depends(requireOpenAiKey)])
    app.include_router(apiRouter, dependencies=[Depends(requireApiKey)])


@pytest.fixture
def makeApp(makeSettings):
    """Factory: the service app with test routes, [ratelimit] overrides and the given clock."""

    def factory(clock=None, **ratelimit) -> FastAPI:
        settings = makeSettings(ratelimit=ratelimit) if ratelimit else makeSettings()
        app = createApp(settings)
        if clock is not None:
            app.state.rateLimiter = RateLimiter(settings, clock)
        app.state.release = asyncio.Event()
        _testRoutes(app)
        return app

    return factory


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver")


# --- the bucket itself -------------------------------------------------------------------------------------------

def test_bucketGivesBurstThenTheExactWait() -> None:
    bucket = TokenBucket(capacity=3, ratePerSecond=0.5, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(2.0)
    assert bucket.take(1.5) == pytest.approx(0.5)
    assert bucket.take(2.0) == 0.0
    assert bucket.take(2.0) == pytest.approx(2.0)


def test_bucketRefillsContinuouslyUpToCapacity() -> None:
    bucket = TokenBucket(capacity=4, ratePerSecond=2.0, now=0.0)
    for _ in range(4):
        bucket.take(0.0)
    assert bucket.remaining(0.75) == 1
    assert bucket.remaining(1.0) == 2
    assert bucket.remaining(100.0) == 4
    assert [bucket.take(100.0) for _ in range(5)][-1] == pytest.approx(0.5)


def test_retryAfterRoundsUpToWholeSeconds() -> None:
    assert retryAfterSeconds(1.5) == 2
    assert retryAfterSeconds(2.0) == 2
    assert retryAfterSeconds(0.01) == 1
    assert retryAfterSeconds(2.0 + 1e-12) == 2


# --- configuration ------------------------------------------------------------------------------------------------

def test_classDefaultsAndPerKeyOverrides(makeSettings) -> None:
    settings = makeSettings(ratelimit={"api_requests_per_minute": 30, "api_burst": 3, "openai_requests_per_minute": 90,
                                       "openai_burst": 9, "max_concurrent_per_key": 4, "per_key": "kiva=1200/100/32"})
    gateway = keyLimitsFor(settings, "api", "gateway")
    cursor = keyLimitsFor(settings, "openai", "cursor")
    kiva = keyLimitsFor(settings, "openai", "kiva")
    assert (gateway.requestsPerMinute, gateway.burst, gateway.concurrent) == (30, 3, 4)
    assert (cursor.requestsPerMinute, cursor.burst, cursor.concurrent) == (90, 9, 4)
    assert (kiva.requestsPerMinute, kiva.burst, kiva.concurrent) == (1200, 100, 32)


def test_perKeyOverrideMayLeaveOutTrailingParts(makeSettings) -> None:
    settings = makeSettings(ratelimit={"openai_burst": 9, "max_concurrent_per_key": 4, "per_key": "kiva=30"})
    kiva = keyLimitsFor(settings, "openai", "kiva")
    assert (kiva.requestsPerMinute, kiva.burst, kiva.concurrent) == (30, 9, 4)


@pytest.mark.parametrize("perKey, message", [
    ("nobody=10/1/1", "'nobody' is not a key name"),
    ("kiva=fast/1/1", "must be <requests per minute>/<burst>/<concurrent>"),
    ("kiva=10/0/1", "positive numbers"),
    ("kiva=10/1/1/1", "must be"),
])
def test_badPerKeyEntriesAreRefusedAtStart(makeSettings, perKey: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"\[ratelimit\] per_key") as caught:
        makeSettings(ratelimit={"per_key": perKey})
    assert message in str(caught.value)


# --- exactness through the service ----------------------------------------------------------------------------------

async def test_concurrentClientsGetAtMostCapacityPlusRefill(makeApp) -> None:
    clock = FakeClock()
    capacity, perMinute, clients, seconds, step = 5, 90, 8, 10.0, 0.05
    app = makeApp(clock, openai_burst=capacity, openai_requests_per_minute=perMinute, max_concurrent_per_key=64)
    statuses: list[int] = []
    async with app.router.lifespan_context(app), _client(app) as client:
        async def hammer() -> None:
            statuses.append((await client.get("/v1/models", headers=BEARER)).status_code)

        for _ in range(round(seconds / step)):
            await asyncio.gather(*(hammer() for _ in range(clients)))
            clock.now += step
    accepted = statuses.count(200)
    allowed = capacity + perMinute * seconds / 60
    assert set(statuses) == {200, 429}
    assert accepted <= allowed + 1
    assert accepted >= allowed - 1, "the limiter refused requests it had tokens for"


async def test_firstRefusalsRetryAfterIsWhenTheNextTokenArrives(makeApp) -> None:
    clock = FakeClock()
    app = makeApp(clock, openai_burst=3, openai_requests_per_minute=40)  # one token every 1.5 s
    async with app.router.lifespan_context(app), _client(app) as client:
        remaining = [(await client.get("/v1/models", headers=BEARER)).headers["x-ratelimit-remaining"]
                     for _ in range(3)]
        refused = await client.get("/v1/models", headers=BEARER)
        refusedAt = clock.now
        while (await client.get("/v1/models", headers=BEARER)).status_code == 429:
            clock.now += 0.01
        available = clock.now - refusedAt
    assert remaining == ["2", "1", "0"]
    assert refused.status_code == 429
    retryAfter = int(refused.headers["retry-after"])
    assert retryAfter - 1 < available <= retryAfter
    assert math.isclose(available, 1.5, abs_tol=0.011)
    assert refused.headers["x-ratelimit-limit"] == "3" and refused.headers["x-ratelimit-remaining"] == "0"


async def test_eachKeyHasItsOwnBucket(makeApp) -> None:
    app = makeApp(FakeClock(), openai_burst=2, openai_requests_per_minute=1)
    async with app.router.lifespan_context(app), _client(app) as client:
        cursor = [(await client.get("/v1/models", headers=BEARER)).status_code for _ in range(3)]
        kiva = (await client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_OPENAI_KEY}"})).status_code
    assert cursor == [200, 200, 429]
    assert kiva == 200


# --- the 429 answers --------------------------------------------------------------------------------------------

async def test_openAiSdkGetsRateLimitErrorEnvelope(makeApp) -> None:
    app = makeApp(FakeClock(), openai_burst=1, openai_requests_per_minute=6)
    async with app.router.lifespan_context(app), _client(app) as http:
        sdk = openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url="http://testserver/v1", http_client=http,
                                 max_retries=0)
        await sdk.models.list()
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.models.list()
    error = caught.value
    assert error.status_code == 429
    assert error.type == "rate_limit_error" and error.code == "rate_limit_exceeded"
    assert "'cursor'" in error.message and "Retry after 10 s" in error.message
    assert error.response.headers["retry-after"] == "10"


async def test_openAiSdkRetriesAfterTheAnnouncedTime(makeApp) -> None:
    app = makeApp(openai_burst=1, openai_requests_per_minute=60)  # real clock: the next token comes after 1 s
    statuses: list[int] = []
    app.state.requestObservers.append(lambda meta: statuses.append(meta.status))
    async with app.router.lifespan_context(app), _client(app) as http:
        sdk = openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url="http://testserver/v1", http_client=http,
                                 max_retries=2)
        await sdk.models.list()
        await sdk.models.list()
    assert statuses[0] == 200 and statuses[-1] == 200
    assert 429 in statuses


async def test_analysisApiGetsTheSameInformationInItsShape(makeApp) -> None:
    app = makeApp(FakeClock(), api_burst=1, api_requests_per_minute=20)
    async with app.router.lifespan_context(app), _client(app) as client:
        first = await client.get("/api/_test/ping", headers={"X-API-Key": API_KEY})
        refused = await client.get("/api/_test/ping", headers={"X-API-Key": API_KEY})
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining"] == "0"
    body = refused.json()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
    assert body["code"] == "rate_limit_exceeded" and body["retryAfter"] == 3 and body["limit"] == 1
    assert body["requestId"] == refused.headers["x-request-id"]
    assert "'gateway'" in body["detail"]


async def test_refusalsAreMarkedForMetrics(makeApp) -> None:
    app = makeApp(FakeClock(), openai_burst=1)
    seen: list[tuple[int, bool, str | None]] = []
    app.state.requestObservers.append(lambda meta: seen.append((meta.status, meta.rateLimited, meta.keyName)))
    async with app.router.lifespan_context(app), _client(app) as client:
        for _ in range(2):
            await client.get("/v1/models", headers=BEARER)
    assert seen == [(200, False, "cursor"), (429, True, "cursor")]


# --- requests in flight ------------------------------------------------------------------------------------------

async def test_concurrencySlotIsHeldUntilTheStreamEnds(makeApp) -> None:
    app = makeApp(FakeClock(), max_concurrent_per_key=2, openai_burst=100)
    state = app.state.rateLimiter.states[("openai", "cursor")]
    async with app.router.lifespan_context(app), _client(app) as client:
        streams = [asyncio.create_task(client.get("/v1/_test/hold", headers=BEARER)) for _ in range(2)]
        assert await asyncio.to_thread(waitFor, lambda: state.inFlight == 2)
        refused = await client.get("/v1/models", headers=BEARER)
        other = await client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_OPENAI_KEY}"})
        app.state.release.set()
        finished = await asyncio.gather(*streams)
        after = await client.get("/v1/models", headers=BEARER)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert "at most 2" in refused.json()["error"]["message"]
    assert other.status_code == 200
    assert [r.text for r in finished] == ["started\nfinished\n"] * 2
    assert after.status_code == 200 and state.inFlight == 0


async def test_slotIsFreedAfterAnError(makeApp) -> None:
    app = makeApp(FakeClock(), max_concurrent_per_key=1, openai_burst=100)
    async with app.router.lifespan_context(app), _client(app) as client:
        statuses = [(await client.get("/v1/_test/fail", headers=BEARER)).status_code for _ in range(3)]
    assert statuses == [502, 502, 502]
    assert app.state.rateLimiter.states[("openai", "cursor")].inFlight == 0


def test_slotIsFreedWhenTheClientDisconnectsMidStream(makeApp) -> None:
    app = makeApp(max_concurrent_per_key=1, openai_burst=100)
    state = app.state.rateLimiter.states[("openai", "cursor")]
    with liveServer(app) as baseUrl:
        with httpx.Client(base_url=baseUrl) as client:
            with client.stream("GET", "/v1/_test/hold", headers=BEARER) as response:
                chunks = response.iter_bytes()  # keep a reference: a dropped iterator closes the response
                assert next(chunks) == b"started\n"
                assert state.inFlight == 1
                assert client.get("/v1/models", headers=BEARER).status_code == 429
        assert waitFor(lambda: state.inFlight == 0)
        assert httpx.get(baseUrl + "/v1/models", headers=BEARER).status_code == 200
