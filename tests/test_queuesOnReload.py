"""Admission queues across a configuration reload (in-process service, Ollama daemons played by stubs, the reload
read from config.ini by ``reloadConfig`` as SIGHUP does): requests waiting in the queue of an upstream that starts
draining (or goes down) move to another upstream with the model (keeping the deadline of their wait), or get 503
with Retry-After when none is left, and are never sent to it; its running requests finish. ``num_parallel``,
``max_queue``, ``max_queue_wait_seconds`` and ``queue_weights`` apply to the next admission decisions. Slots are
taken directly on ``app.state.admission`` so the tests decide who waits, not the clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import createApp, reloadConfig
from config import loadSettings
from tests.conftest import API_KEY, API_KEY_NAME, OPENAI_KEY, OPENAI_KEY_NAME
from tests.ollamaStub import StubServer

TEXT, TEXT_MODEL = "poweron-text-general", "qwen2.5:7b"
BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
HELLO = {"model": TEXT, "messages": [{"role": "user", "content": "Hallo"}]}
WAIT_SECONDS = 10.0


def iniText(upstreams: dict[str, StubServer], drain: str = "", numParallel: int = 1, maxQueue: int = 4,
            maxWait: float = 30, weights: str = "") -> str:
    pairs = ", ".join(f"{name}={stub.baseUrl}" for name, stub in upstreams.items())
    return f"""
[auth]
api_keys = {API_KEY_NAME}={API_KEY}
openai_keys = {OPENAI_KEY_NAME}={OPENAI_KEY}

[ratelimit]
queue_weights = {weights}

[ollama]
upstreams = {pairs}
drain = {drain}
discovery_ttl = 0.5
num_parallel = {numParallel}
max_queue = {maxQueue}
max_queue_wait_seconds = {maxWait}
queue_notice_seconds = 0.05

[whisper]
base_url = http://127.0.0.1:9
enabled = false

[warmup]
models =
"""


@pytest.fixture(scope="module")
def daemons() -> Iterator[dict[str, StubServer]]:
    """gpu1 and gpu2 with every model; embedOnly without the text model."""
    servers = {"gpu1": StubServer().start(), "gpu2": StubServer().start(),
               "embedOnly": StubServer(models=["nomic-embed-text:latest"]).start()}
    yield servers
    for server in servers.values():
        server.stop()


class Service:
    def __init__(self, app: Any, http: httpx.AsyncClient, ini: Path) -> None:
        self.app, self.http, self.ini = app, http, ini
        self.admission = app.state.admission

    def hold(self, upstream: str, model: str = TEXT_MODEL) -> Any:
        """One slot of the model at the upstream, taken by another key (a request running there)."""
        pulled = self.app.state.pool.nodes[upstream].pulledNameFor(model)
        return self.admission.enqueue(upstream, pulled, "somebodyElse")

    def waiting(self, upstream: str) -> int:
        """Requests waiting at the upstream (any model; the tests use one)."""
        return sum(len(queue.limiter.waiting) for (name, _model), queue in self.admission.queues.items()
                   if name == upstream)

    async def until(self, condition: Any, what: str) -> None:
        for _ in range(int(WAIT_SECONDS / 0.01)):
            if condition():
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"timed out waiting for {what}")

    async def reload(self, text: str) -> None:
        self.ini.write_text(text)
        assert await reloadConfig(self.app)


@pytest.fixture
async def start(testIni: Path) -> AsyncIterator[Any]:
    """Start the service in-process with ``iniText(**options)`` written to config.ini."""
    async with contextlib.AsyncExitStack() as stack:
        async def starter(**options: Any) -> Service:
            testIni.write_text(iniText(**options))
            app = createApp(loadSettings())
            await stack.enter_async_context(app.router.lifespan_context(app))
            http = await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://service", timeout=30))
            return Service(app, http, testIni)

        yield starter


def chatsAt(stub: StubServer) -> int:
    recorded = httpx.get(stub.url("/_stub/requests?path=/api/chat")).json()["requests"]
    return sum(1 for request in recorded if (request.get("body") or {}).get("messages"))


async def queuedAtOneOf(service: Service, request: asyncio.Task) -> tuple[str, str]:
    """Wait until the request waits at gpu1 or gpu2; (where it waits, the other one)."""
    await service.until(lambda: service.waiting("gpu1") + service.waiting("gpu2") == 1 or request.done(),
                        "the request queued")
    assert not request.done(), request.result().text
    return ("gpu1", "gpu2") if service.waiting("gpu1") else ("gpu2", "gpu1")


@pytest.mark.parametrize(("stream", "how"), [(False, "drain"), (True, "drain"), (False, "remove")])
async def test_aQueuedRequestMovesToAnotherUpstreamWhenItsUpstreamDrains(start, daemons, stream: bool,
                                                                         how: str) -> None:
    upstreams = {name: daemons[name] for name in ("gpu1", "gpu2")}
    service = await start(upstreams=upstreams)
    holders = {name: service.hold(name) for name in upstreams}
    before = {name: chatsAt(stub) for name, stub in upstreams.items()}
    request = asyncio.create_task(service.http.post("/v1/chat/completions", json={**HELLO, "stream": stream},
                                                    headers=BEARER))
    drained, other = await queuedAtOneOf(service, request)
    if how == "drain":
        await service.reload(iniText(upstreams, drain=drained))
    else:
        await service.reload(iniText({other: upstreams[other]}))
    holders[drained].release()  # its running request finished: that frees no slot for the queued one there
    await service.until(lambda: service.waiting(other) == 1, f"the request queued at {other}")
    assert service.waiting(drained) == 0
    holders[other].release()
    response = await request
    assert response.status_code == 200 and '"error"' not in response.text, response.text
    assert chatsAt(upstreams[drained]) == before[drained], "a request went to the draining upstream"
    assert chatsAt(upstreams[other]) == before[other] + 1


async def test_aQueuedRequestGets503WhenNoOtherUpstreamHasTheModel(start, daemons) -> None:
    upstreams = {"gpu1": daemons["gpu1"], "embedOnly": daemons["embedOnly"]}
    service = await start(upstreams=upstreams)
    holder = service.hold("gpu1")
    before = chatsAt(daemons["gpu1"])
    request = asyncio.create_task(service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER))
    await service.until(lambda: service.waiting("gpu1") == 1 or request.done(), "the request queued")
    await service.reload(iniText(upstreams, drain="gpu1"))
    holder.release()
    response = await request
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "upstream_unavailable" and "gpu1: draining" in error["message"]
    assert chatsAt(daemons["gpu1"]) == before


async def test_aQueuedRequestLeavesAnUpstreamThatGoesDown(start) -> None:
    upstreams = {"gpu1": StubServer().start(), "gpu2": StubServer().start()}
    try:
        service = await start(upstreams=upstreams)
        holders = {name: service.hold(name) for name in upstreams}
        request = asyncio.create_task(service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER))
        down, other = await queuedAtOneOf(service, request)
        upstreams[down].stop()  # discovery finds it gone within a second and marks it down
        await service.until(lambda: service.waiting(other) == 1, f"the request queued at {other}")
        holders[other].release()
        response = await request
        assert response.status_code == 200, response.text
        assert chatsAt(upstreams[other]) == 1
        holders[down].release()
    finally:
        for stub in upstreams.values():
            stub.stop()


async def test_aReloadAppliesSlotsQueueLimitsWaitAndWeightsToTheNextDecisions(start, daemons) -> None:
    upstreams = {"gpu1": daemons["gpu1"]}
    service = await start(upstreams=upstreams, numParallel=1, maxQueue=4, maxWait=30)
    holder = service.hold("gpu1")
    waiting = asyncio.create_task(service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER))
    await service.until(lambda: service.waiting("gpu1") == 1 or waiting.done(), "the request queued")
    await service.reload(iniText(upstreams, numParallel=2, maxQueue=0, maxWait=7, weights=f"{OPENAI_KEY_NAME}=4"))
    response = await asyncio.wait_for(waiting, WAIT_SECONDS)  # the second slot is its: no wait for the holder
    assert response.status_code == 200, response.text
    second = service.hold("gpu1")  # both slots busy now, and no queue
    refused = await service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    limiter = service.admission.queueFor("gpu1", service.app.state.pool.nodes["gpu1"].pulledNameFor(TEXT_MODEL)).limiter
    assert (limiter.limit, limiter.maxQueue, limiter.maxWaitSeconds) == (2, 0, 7)
    assert limiter.weights == {OPENAI_KEY_NAME: 4} == service.app.state.renderPool.slots.weights
    await service.reload(iniText(upstreams, numParallel=1))  # fewer slots: the running requests go on
    assert holder.admitted and not holder.released and second.admitted and limiter.busy == 2
    holder.release()
    second.release()


@pytest.mark.parametrize("stream", [False, True])
async def test_aMovedRequestKeepsTheDeadlineItArrivedWith(start, daemons, stream: bool) -> None:
    """Moved after waiting most of its longest wait, it waits only the rest at the other upstream (not a fresh
    longest wait there) and then gets the usual queue_timeout with Retry-After."""
    maxWait, movedAfter = 3.0, 2.0
    upstreams = {name: daemons[name] for name in ("gpu1", "gpu2")}
    service = await start(upstreams=upstreams, maxWait=maxWait)
    holders = {name: service.hold(name) for name in upstreams}
    loop = asyncio.get_running_loop()
    startedAt = loop.time()
    request = asyncio.create_task(service.http.post("/v1/chat/completions", json={**HELLO, "stream": stream},
                                                    headers=BEARER))
    drained, other = await queuedAtOneOf(service, request)
    await asyncio.sleep(movedAfter - (loop.time() - startedAt))
    await service.reload(iniText(upstreams, drain=drained, maxWait=maxWait))
    await service.until(lambda: service.waiting(other) == 1 or request.done(), f"the request queued at {other}")
    response = await request
    waited = loop.time() - startedAt
    assert waited < maxWait + 1.0, f"the moved request waited {waited:.1f} s in all (longest wait {maxWait} s)"
    if stream:
        assert response.status_code == 200 and "queue_timeout" in response.text, response.text
    else:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "queue_timeout" and int(response.headers["retry-after"]) >= 1
    for holder in holders.values():
        holder.release()


async def test_aRequestThatWaitedTooLongIsNotQueuedAfreshElsewhere(start, daemons) -> None:
    """A queue_timeout at one upstream may still try another one, but within the same deadline: a free slot there
    serves it, a busy one refuses it at once."""
    maxWait = 1.5
    upstreams = {name: daemons[name] for name in ("gpu1", "gpu2")}
    service = await start(upstreams=upstreams, maxWait=maxWait)
    holders = {name: service.hold(name) for name in upstreams}
    loop = asyncio.get_running_loop()
    startedAt = loop.time()
    response = await service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER)
    waited = loop.time() - startedAt
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_timeout", response.text
    assert int(response.headers["retry-after"]) >= 1
    assert waited < maxWait + 1.0, f"the request waited {waited:.1f} s in all (longest wait {maxWait} s)"
    for holder in holders.values():
        holder.release()
