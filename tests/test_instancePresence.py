"""Instances announce themselves in Redis (a heartbeat per instance that expires after a few intervals), and with
``fail_closed`` the per-instance share while Redis is unreachable follows the number of instances alive at the last
successful heartbeat; ``[state] instances`` applies only when no count was ever seen. Real redis-server, real
service processes (and, for the slots, two stores in this process against one redis-server)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import OPENAI_KEY, TEST_INI
from tests.redisServer import RedisServer, redisAvailable

pytestmark = pytest.mark.skipif(not redisAvailable(), reason="redis-server not installed (make test-deps)")

BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
BURST = 12
CONFIGURED_INSTANCES = 4
"""The hand-set fallback: different from every live count the tests produce, so a share taken from it shows."""
HEARTBEAT_SECONDS = 0.5
TTL_SECONDS = 3 * HEARTBEAT_SECONDS


@pytest.fixture
def redis(tmp_path: Path):
    with RedisServer(tmp_path) as server:
        yield server


def serviceEnv(redis: RedisServer, stub, heartbeatSeconds: float = HEARTBEAT_SECONDS) -> dict[str, str]:
    return {"PRIVATE_LLM_STATE__REDIS_URL": redis.url, "PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
            "PRIVATE_LLM_RATELIMIT__PER_KEY": f"cursor=6/{BURST}/64",  # 0.1 token/s: the burst is what a test sees
            "PRIVATE_LLM_STATE__FAILURE_MODE": "fail_closed",
            "PRIVATE_LLM_STATE__INSTANCES": str(CONFIGURED_INSTANCES),
            "PRIVATE_LLM_STATE__HEARTBEAT_SECONDS": str(heartbeatSeconds)}


def _state(baseUrl: str) -> dict:
    return httpx.get(baseUrl + "/health", headers=BEARER, timeout=5).json()["state"]  # the details need a key


def _waitFor(baseUrl: str, condition, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(state := _state(baseUrl)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return state


def _liveMetric(baseUrl: str) -> float | None:
    text = httpx.get(baseUrl + "/metrics", headers=BEARER, timeout=5).text
    match = re.search(r"^poweron_state_instances (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def _admittedUntilRefused(baseUrl: str) -> int:
    with httpx.Client(base_url=baseUrl, headers=BEARER, timeout=5) as client:
        statuses = [client.get("/v1/models").status_code for _ in range(BURST + 2)]
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.index(429) if 429 in statuses else len(statuses)
    assert statuses[admitted:] == [429] * (len(statuses) - admitted), statuses
    return admitted


def _twoInstances(redis: RedisServer, stub, serviceFactory, heartbeatSeconds: float = HEARTBEAT_SECONDS):
    env = serviceEnv(redis, stub, heartbeatSeconds)
    first, second = serviceFactory(env), serviceFactory(env)
    for service in (first, second):
        assert _waitFor(service.baseUrl, lambda state: state["instances"] == 2)["instances"] == 2
    return first, second


def test_twoInstancesAgainstOneRedisSeeTwo(redis, stub, serviceFactory):
    first, second = _twoInstances(redis, stub, serviceFactory)
    for service in (first, second):
        state = _state(service.baseUrl)
        assert state["reachable"] is True and state["instances"] == 2 and state["share_divisor"] == 2
        assert _liveMetric(service.baseUrl) == 2.0
    assert int(redis.command("ZCARD", "poweron:instances").strip().lstrip(b":")) == 2
    assert httpx.get(first.baseUrl + "/health", timeout=5).json().get("state") is None  # no key, no details


def test_aStoppedHeartbeatLeavesAfterTheTtlAndRedisDownGivesTheFullLimit(redis, stub, serviceFactory):
    survivor, doomed = _twoInstances(redis, stub, serviceFactory)
    os.kill(doomed.process.pid, signal.SIGSTOP)  # its heartbeat stops; nothing tells Redis it is gone
    try:
        stoppedAt = time.monotonic()
        assert _state(survivor.baseUrl)["instances"] == 2  # not gone at once: its announcement lasts the TTL
        state = _waitFor(survivor.baseUrl, lambda state: state["instances"] == 1)
        goneAfter = time.monotonic() - stoppedAt
        assert state["instances"] == 1 and state["share_divisor"] == 1
        assert goneAfter <= TTL_SECONDS + HEARTBEAT_SECONDS + 1.0, f"seen gone after {goneAfter:.2f} s"
        assert _liveMetric(survivor.baseUrl) == 1.0
        redis.stop()
        state = _waitFor(survivor.baseUrl, lambda state: state["reachable"] is False)
        assert state["reachable"] is False and state["instances"] == 1 and state["share_divisor"] == 1
        assert _admittedUntilRefused(survivor.baseUrl) == BURST  # full limit / 1 live instance, not / 4 configured
    finally:
        os.kill(doomed.process.pid, signal.SIGCONT)


def test_aGracefulStopLeavesAtOnce(redis, stub, serviceFactory):
    heartbeatSeconds = 2.0  # announcements last 6 s: only taking it out on shutdown makes it leave sooner
    survivor, leaving = _twoInstances(redis, stub, serviceFactory, heartbeatSeconds)
    stoppedAt = time.monotonic()
    leaving.stop()
    assert int(redis.command("ZCARD", "poweron:instances").strip().lstrip(b":")) == 1
    assert _waitFor(survivor.baseUrl, lambda state: state["instances"] == 1)["instances"] == 1
    assert time.monotonic() - stoppedAt < 3 * heartbeatSeconds, "a stopped instance takes its announcement along"


def test_failClosedShareIsTheFullLimitOverTheLastLiveCount(redis, stub, serviceFactory):
    first, second = _twoInstances(redis, stub, serviceFactory)
    redis.stop()
    for service in (first, second):
        state = _waitFor(service.baseUrl, lambda state: state["reachable"] is False)
        assert state["reachable"] is False and state["instances"] == 2 and state["share_divisor"] == 2
        assert _admittedUntilRefused(service.baseUrl) == BURST // 2  # not BURST // CONFIGURED_INSTANCES
        assert _liveMetric(service.baseUrl) == 2.0  # the last count seen


def test_noCountEverSeenFallsBackToTheConfiguredInstances(tmp_path, stub, serviceFactory):
    redis = RedisServer(tmp_path)  # never started: Redis is down from the start
    service = serviceFactory(serviceEnv(redis, stub))
    state = _state(service.baseUrl)
    assert state["reachable"] is False and state["instances"] is None
    assert state["share_divisor"] == CONFIGURED_INSTANCES
    assert _admittedUntilRefused(service.baseUrl) == BURST // CONFIGURED_INSTANCES
    assert _liveMetric(service.baseUrl) is None


async def test_failClosedSlotsFollowTheLastLiveCount(redis):
    from state.redisStore import RedisStore
    from state.slots import slotPoolFor

    stores = [RedisStore(redis.url, leaseSeconds=5, timeoutSeconds=0.25, heartbeatSeconds=30) for _ in range(2)]
    try:
        for store in stores:
            await store.start()
        await stores[0].heartbeat()  # the second one announced itself after the first one's start
        assert [store.liveInstances for store in stores] == [2, 2]
        pool = slotPoolFor(stores[0], failClosed=True, instances=CONFIGURED_INSTANCES)
        redis.stop()
        await stores[0].probe()
        assert stores[0].reachable is False
        leases = [await pool.tryAcquire("default", "m", 8) for _ in range(6)]
        assert sum(lease is not None for lease in leases) == 4  # 8 / 2 live, not 8 / 4 configured
    finally:
        for store in stores:
            await store.close()


async def test_aReloadAppliesANewHeartbeatPeriodAndItsExpiry(redis, testIni):
    """SIGHUP's reload (``reloadConfig``) with a changed ``heartbeat_seconds``: the announcement in Redis lasts three
    new intervals at once, and the next beats come at the new period (not after the old one has run out)."""
    from app import createApp, reloadConfig
    from config import loadSettings
    from state.redisStore import INSTANCES_KEY

    def iniWith(heartbeatSeconds: float) -> str:
        return TEST_INI + f"\n[state]\nredis_url = {redis.url}\nheartbeat_seconds = {heartbeatSeconds}\n"

    testIni.write_text(iniWith(0.5))
    app = createApp(loadSettings())
    async with app.router.lifespan_context(app):
        store = app.state.sharedState

        async def expiresIn() -> float:
            """Seconds until this instance's announcement expires, by Redis' clock."""
            score = await store.client.zscore(INSTANCES_KEY, store.instanceId)
            seconds, micros = await store.client.time()
            return score / 1000 - (seconds + micros / 1e6)

        testIni.write_text(iniWith(30))
        assert await reloadConfig(app)
        await asyncio.sleep(1.2)  # two beats of the old period
        assert await expiresIn() > 60, "the announcement does not last three new intervals"
        testIni.write_text(iniWith(0.2))
        assert await reloadConfig(app)
        await asyncio.sleep(1.2)  # no beat within it would have let a 0.6 s announcement run out
        assert 0 < await expiresIn() <= 0.6 + 0.1, "the beats do not come at the new period"
