"""Shared limits across instances with a real redis-server: two real service processes and one key get the key's
limits once (admitted <= burst + rate x time), a killed instance's in-flight slots come back within the lease, and
while Redis is down the service keeps answering (200/429, never 5xx) with per-instance limits, /health says
degraded, one log line per change, and the shared limits resume when Redis returns."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import OPENAI_KEY, ServiceProcess, assertNoNetworkViolation, childPids, waitForHttp
from tests.redisServer import RedisServer, redisAvailable

pytestmark = pytest.mark.skipif(not redisAvailable(), reason="redis-server not installed (make test-deps)")

BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
RATE_PER_MINUTE, BURST = 120, 10
LEASE_SECONDS = 2.0


@pytest.fixture
def redis(tmp_path: Path):
    with RedisServer(tmp_path) as server:
        yield server


def serviceEnv(redis: RedisServer, stub, perKey: str, **extra: str) -> dict[str, str]:
    return {"PRIVATE_LLM_STATE__REDIS_URL": redis.url, "PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
            "PRIVATE_LLM_RATELIMIT__PER_KEY": perKey, "PRIVATE_LLM_STATE__LEASE_SECONDS": str(LEASE_SECONDS),
            **extra}


def test_twoInstancesGiveOneKeyItsLimitsOnce(redis, stub, serviceFactory):
    env = serviceEnv(redis, stub, f"cursor={RATE_PER_MINUTE}/{BURST}/64")
    first, second = serviceFactory(env), serviceFactory(env)
    statuses: dict[str, list[int]] = {first.baseUrl: [], second.baseUrl: []}
    lock = threading.Lock()
    stopAt = time.monotonic() + 3.0

    def hammer(baseUrl: str) -> None:
        with httpx.Client(base_url=baseUrl, headers=BEARER, timeout=10) as client:
            while time.monotonic() < stopAt:
                status = client.get("/v1/models").status_code
                with lock:
                    statuses[baseUrl].append(status)

    startedAt = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(hammer, [first.baseUrl, second.baseUrl] * 2))
    elapsed = time.monotonic() - startedAt
    everything = statuses[first.baseUrl] + statuses[second.baseUrl]
    admitted = everything.count(200)
    assert set(everything) <= {200, 429}
    assert everything.count(429) > 0, "the load must exceed the limit for the test to mean anything"
    assert statuses[first.baseUrl].count(200) > 0 and statuses[second.baseUrl].count(200) > 0
    assert BURST <= admitted <= BURST + RATE_PER_MINUTE / 60 * elapsed + 1, (admitted, elapsed)


def _holdStreams(baseUrl: str, count: int) -> list[threading.Thread]:
    def hold() -> None:
        body = {"model": "poweron-text-general", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        try:
            with httpx.Client(timeout=30) as client:
                client.post(baseUrl + "/v1/chat/completions", json=body, headers=BEARER)
        except httpx.HTTPError:
            pass  # the instance is killed under it

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _inFlight(redis: RedisServer) -> int:
    reply = redis.command("ZCARD", "poweron:inflight:openai:cursor")
    return int(reply.strip().lstrip(b":"))


def test_aKilledInstancesSlotsComeBackWithinTheLease(redis, stub, stubControl, serviceFactory):
    env = serviceEnv(redis, stub, "cursor=6000/100/2")
    doomed, survivor = serviceFactory(env), serviceFactory(env)
    stubControl.post("/_stub/config", json={"fault": "hang", "faultPaths": ["/api/chat"]}).raise_for_status()
    _holdStreams(doomed.baseUrl, 2)
    deadline = time.monotonic() + 10
    while _inFlight(redis) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _inFlight(redis) == 2
    time.sleep(LEASE_SECONDS * 1.5)  # longer than the lease: the live instance renews what it holds
    refused = httpx.get(survivor.baseUrl + "/v1/models", headers=BEARER, timeout=5)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    doomed.process.kill()  # no shutdown: nothing gives the slots back but their expiry
    killedAt = time.monotonic()
    while time.monotonic() - killedAt < LEASE_SECONDS + 3:
        if httpx.get(survivor.baseUrl + "/v1/models", headers=BEARER, timeout=5).status_code == 200:
            break
        time.sleep(0.1)
    freedAfter = time.monotonic() - killedAt
    assert freedAfter <= LEASE_SECONDS + 0.5, f"slots came back after {freedAfter:.2f} s"


def _health(baseUrl: str) -> dict:
    return httpx.get(baseUrl + "/health", headers=BEARER, timeout=5).json()  # the details need a key


def _waitForHealth(baseUrl: str, reachable: bool, timeout: float = 6.0) -> dict:
    deadline = time.monotonic() + timeout
    while (body := _health(baseUrl))["state"]["reachable"] is not reachable and time.monotonic() < deadline:
        time.sleep(0.1)
    return body


def test_redisDownKeepsServingWithPerInstanceLimitsAndRejoins(redis, stub, serviceFactory):
    service = serviceFactory(serviceEnv(redis, stub, "cursor=6/3/64"))
    with httpx.Client(base_url=service.baseUrl, headers=BEARER, timeout=5) as client:
        assert _health(service.baseUrl)["state"] == {"backend": "redis", "reachable": True, "failure_mode": "fail_open",
                                                     "instances": 1, "share_divisor": 1}
        assert [client.get("/v1/models").status_code for _ in range(4)] == [200, 200, 200, 429]
        redis.stop()
        during = [client.get("/v1/models").status_code for _ in range(6)]
        assert all(status in (200, 429) for status in during), during
        assert during[:3] == [200, 200, 200] and during[3:] == [429, 429, 429]  # the instance's own bucket, full
        body = _waitForHealth(service.baseUrl, False)
        assert body["status"] == "degraded" and body["state"]["reachable"] is False
        redis.start()
        body = _waitForHealth(service.baseUrl, True)
        assert body["status"] == "ok" and body["state"]["reachable"] is True
        assert client.get("/v1/models").status_code == 200
    assert int(redis.command("EXISTS", "poweron:bucket:openai:cursor").strip().lstrip(b":")) == 1
    log = service.logText()
    assert log.count("shared state: Redis unreachable") == 1, log
    assert log.count("shared state: Redis reachable") == 2  # at start and when it came back


def test_anInstanceStartsWhileRedisIsDownAndJoinsLater(tmp_path, stub, serviceFactory):
    redis = RedisServer(tmp_path)  # not started yet
    service = serviceFactory(serviceEnv(redis, stub, "cursor=600/30/64", PRIVATE_LLM_STATE__FAILURE_MODE="fail_closed"))
    try:
        assert httpx.get(service.baseUrl + "/v1/models", headers=BEARER, timeout=5).status_code == 200
        body = _health(service.baseUrl)
        assert body["status"] == "degraded" and body["state"]["failure_mode"] == "fail_closed"
        redis.start()
        assert _waitForHealth(service.baseUrl, True)["status"] == "ok"
    finally:
        redis.stop()


def test_failClosedGivesEachInstanceItsShareOfTheLimits(makeSettings):
    from guard.rateLimit import RateLimiter

    settings = makeSettings(ratelimit={"per_key": "cursor=600/30/5"})
    share = RateLimiter(settings, instances=2).states[("openai", "cursor")].limits
    assert (share.requestsPerMinute, share.burst, share.concurrent) == (300, 15, 2)


@pytest.mark.parametrize(("server", "state", "message"), [
    ({"workers": 2}, {}, "needs [state] redis_url"),
    ({}, {"redis_url": "redis://203.0.113.7:6379/0"}, "not a loopback or private address"),
    ({}, {"redis_url": "http://127.0.0.1:6379"}, "must start with redis://"),
])
def test_sharedStateSettingsAreCheckedAtStart(makeSettings, server, state, message):
    from config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        makeSettings(server=server, state=state)


def _workerPids(pid: int) -> list[int]:
    return [child for child in childPids(pid) if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def test_twoWorkersServeOnePortWithTheLimitsInRedis(redis, stub, testIni):
    env = serviceEnv(redis, stub, "cursor=6/3/64", PRIVATE_LLM_SERVER__WORKERS="2")
    service = ServiceProcess(testIni, env)
    try:
        service.start(timeout=120)  # three processes importing the app (slow on a busy machine)
        deadline = time.monotonic() + 60
        while len(_workerPids(service.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_workerPids(service.process.pid)) == 2
        waitForHttp(service.baseUrl + "/health/readiness", 60)
        statuses = []
        for _ in range(8):  # new connections land on either worker; the bucket is one
            statuses.append(httpx.get(service.baseUrl + "/v1/models", headers=BEARER, timeout=5).status_code)
        assert statuses.count(200) == 3 and statuses.count(429) == 5
    finally:
        workers = _workerPids(service.process.pid) if service.process else []
        service.stop(timeout=40)
        for pid in workers:  # a worker left behind by a supervisor that was killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assertNoNetworkViolation(service.logText())


def test_twoInstancesKeepAModelsSlotsOnceAtOllama(redis, stub, stubControl, serviceFactory):
    """One slot for the model across both instances: of two simultaneous chats, one per instance, the second
    waits for the first (without shared slots both would run at once: the stub has two)."""
    stubControl.post("/_stub/config", json={"numParallel": 2, "chunks": 10, "chunkDelayMs": 100}).raise_for_status()
    env = serviceEnv(redis, stub, "cursor=6000/100/64", PRIVATE_LLM_OLLAMA__NUM_PARALLEL="1")
    first, second = serviceFactory(env), serviceFactory(env)
    body = {"model": "poweron-text-general", "messages": [{"role": "user", "content": "hi"}]}

    def chat(baseUrl: str) -> tuple[int, float]:
        startedAt = time.monotonic()
        status = httpx.post(baseUrl + "/v1/chat/completions", json=body, headers=BEARER, timeout=30).status_code
        return status, time.monotonic() - startedAt

    for baseUrl in (first.baseUrl, second.baseUrl):  # models discovered and loaded on both
        assert chat(baseUrl)[0] == 200
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(chat, [first.baseUrl, second.baseUrl]))
    assert [status for status, _ in results] == [200, 200]
    quick, slow = sorted(seconds for _, seconds in results)
    assert slow >= quick + 0.7, results  # one chat holds the slot ~1 s


def test_makeRunStartsRedisOnlyWhenConfiguredOnThisMachine(tmp_path):
    import runAll
    from tests.conftest import freePort

    assert runAll.startRedisIfConfigured("") is None
    assert runAll.startRedisIfConfigured("redis://10.1.2.3:6379/0") is None  # not ours to start (never contacted)
    port = freePort()
    process = runAll.startRedisIfConfigured(f"redis://127.0.0.1:{port}/0")
    try:
        assert process is not None
        probe = RedisServer(tmp_path, port)
        deadline = time.monotonic() + 10
        while not probe.ping() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.ping()
        assert runAll.startRedisIfConfigured(f"redis://127.0.0.1:{port}/0") is None  # one answers already
    finally:
        runAll.stop(process)
    assert process.returncode is not None
