"""Admission control through the service (in-process, Ollama played by the stub): 503 + Retry-After in each API's
error shape when the queue is full or the wait too long, queued streams that tell their place, /health and
/metrics. Slots are taken directly on ``app.state.admission`` so the tests decide who waits, not the clock."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from app import createApp
from tests.conftest import API_KEY, OPENAI_KEY
from tests.ollamaStub import StubServer

TEXT, EMBED = "poweron-text-general", "poweron-embed"
BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
API = {"X-API-Key": API_KEY}
HELLO = {"model": TEXT, "messages": [{"role": "user", "content": "Hallo"}]}


class Service:
    def __init__(self, app, http: httpx.AsyncClient) -> None:
        self.app = app
        self.http = http
        self.admission = app.state.admission

    async def ollamaName(self, externalName: str) -> str:
        return (await self.app.state.registry.resolve(externalName)).ollamaName

    async def hold(self, externalName: str = TEXT, count: int = 1) -> list:
        """Take ``count`` places of the model for another key (slots first, then the queue)."""
        model = await self.ollamaName(externalName)
        return [self.admission.enqueue("default", model, "somebodyElse") for _ in range(count)]

    async def untilQueued(self, count: int, externalName: str = TEXT) -> None:
        queue = self.admission.queueFor("default", await self.ollamaName(externalName))
        for _ in range(500):
            if len(queue.limiter.waiting) >= count:
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"never {count} waiting")


@pytest.fixture
async def service(stub: StubServer, stubControl: httpx.Client, makeSettings) -> AsyncIterator[Service]:
    settings = makeSettings(ollama={"base_url": stub.baseUrl, "num_parallel": 1, "num_parallel_per_model": "",
                                    "max_queue": 2, "max_queue_wait_seconds": 5, "queue_notice_seconds": 0.05})
    app = createApp(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service",
                                     timeout=30) as http:
            yield Service(app, http)


async def test_aFullQueueIs503WithRetryAfterInOpenAisEnvelope(service: Service) -> None:
    await service.hold(count=3)  # the slot and both queue places
    response = await service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER)
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "service_unavailable" and "busy" in error["message"]


async def test_aFullQueueIs503OnTheAnalysisApiToo(service: Service) -> None:
    await service.hold(count=3)
    response = await service.http.post("/api/text", json={"model": TEXT, "text": "x", "prompt": "y"}, headers=API)
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["code"] == "queue_full"


async def test_aWaitingRequestIsServedWhenTheSlotFreesAndLogsItsWait(service: Service, caplog) -> None:
    holder, = await service.hold()
    caplog.set_level(logging.INFO, logger="poweron.access")
    pending = asyncio.create_task(service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER))
    await service.untilQueued(1)
    holder.release()
    response = await pending
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    record = next(orjson.loads(r.getMessage()) for r in caplog.records if r.name == "poweron.access")
    assert record["queueMs"] > 0


async def test_waitingTooLongIs503QueueTimeout(service: Service) -> None:
    service.admission.policy = dataclasses.replace(service.admission.policy, maxQueueWaitSeconds=0.05)
    await service.hold()
    response = await service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_timeout"
    assert int(response.headers["retry-after"]) >= 1


async def test_aQueuedStreamTellsItsPlaceThenStreams(service: Service) -> None:
    holder, = await service.hold()

    async def releaseLater() -> None:
        await service.untilQueued(1)
        await asyncio.sleep(0.3)  # several notice intervals (0.05 s)
        holder.release()

    releasing = asyncio.create_task(releaseLater())
    response = await service.http.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=BEARER)
    await releasing
    assert response.status_code == 200
    text = response.text
    assert text.startswith(": queued, position 1\n\n")
    assert text.count(": queued, position 1\n\n") >= 2 and text.endswith("data: [DONE]\n\n")
    assert '"content":"This is' in text.replace(" ", "") or "deterministic" in text


async def test_aQueuedStreamThatWaitsTooLongEndsWithAnErrorFrame(service: Service) -> None:
    model = await service.ollamaName(TEXT)
    service.admission.queueFor("default", model).limiter.maxWaitSeconds = 0.3
    await service.hold()
    response = await service.http.post("/v1/chat/completions", json={**HELLO, "stream": True}, headers=BEARER)
    assert response.status_code == 200
    frames = response.text.split("\n\n")
    assert frames[0] == ": queued, position 1"
    error = orjson.loads(frames[-3].removeprefix("data: "))["error"]
    assert error["code"] == "queue_timeout" and frames[-2] == "data: [DONE]"


async def test_aQueuedNdjsonStreamSendsQueuedEvents(service: Service) -> None:
    holder, = await service.hold()

    async def releaseLater() -> None:
        await service.untilQueued(1)
        await asyncio.sleep(0.3)
        holder.release()

    releasing = asyncio.create_task(releaseLater())
    response = await service.http.post("/api/text", json={"model": TEXT, "text": "x", "prompt": "y", "stream": True},
                                       headers=API)
    await releasing
    events = [orjson.loads(line) for line in response.text.splitlines()]
    assert events[0]["type"] == "start" and events[1] == {"type": "queued", "position": 1}
    assert events[-1]["type"] == "done" and "ready" not in {event["type"] for event in events}


async def test_embeddingsQueueApartWithOneSlot(service: Service) -> None:
    response = await service.http.post("/v1/embeddings", json={"model": EMBED, "input": "Hallo"}, headers=BEARER)
    assert response.status_code == 200
    queue = service.admission.queueFor("default", await service.ollamaName(EMBED))
    assert queue.kind == "embed" and queue.limiter.limit == 1 and queue.limiter.admittedTotal == 1


async def test_healthAndMetricsShowTheQueues(service: Service) -> None:
    await service.hold(count=3)
    refused = await service.http.post("/v1/chat/completions", json=HELLO, headers=BEARER)
    assert refused.status_code == 503
    health = (await service.http.get("/health", headers=API)).json()  # the queues are details: they need a key
    assert "queues" not in (await service.http.get("/health")).json()
    model = await service.ollamaName(TEXT)
    assert {"upstream": "default", "model": model, "slotsBusy": 1, "slots": 1, "queued": 2} in health["queues"]
    metrics = (await service.http.get("/metrics", headers=BEARER)).text
    assert f'poweron_model_queue_length{{model="{model}",upstream="default"}} 2.0' in metrics
    assert f'poweron_model_slots_busy{{model="{model}",upstream="default"}} 1.0' in metrics
    assert f'poweron_queue_refused_total{{key="cursor",model="{model}",reason="queue_full",upstream="default"}} 1.0' \
        in metrics
    assert "poweron_queue_wait_seconds_bucket" in metrics


async def test_queueMetricLabelsComeFromTheConfiguration(service: Service) -> None:
    from observe.queueMetrics import QueueLabels

    labels = QueueLabels(service.app.state.settings)
    assert labels.model("nomic-embed-text:latest") == "nomic-embed-text:latest" and labels.model("x:1b") == "none"
    assert labels.key("cursor") == "cursor" and labels.key("somebodyElse") == "none"


FAULTY_CALLS = [
    ("/v1/chat/completions", BEARER, {**HELLO, "stream": True}),
    ("/v1/chat/completions", BEARER, HELLO),
    ("/api/text", API, {"model": TEXT, "text": "x", "prompt": "y", "stream": True}),
    ("/api/text", API, {"model": TEXT, "text": "x", "prompt": "y"}),
    ("/v1/embeddings", BEARER, {"model": EMBED, "input": "Hallo"}),
    ("/api/embed", API, {"texts": ["Hallo"]}),
]


@pytest.mark.parametrize("fault", ["midstreamError", "truncate", "malformedLine", "busy"])
async def test_everyUpstreamFaultGivesItsSlotBack(service: Service, stubControl: httpx.Client, fault: str) -> None:
    stubControl.post("/_stub/config", json={"fault": fault}).raise_for_status()
    for path, headers, body in FAULTY_CALLS:
        response = await service.http.post(path, json=body, headers=headers)
        assert response.status_code in (200, 502, 503), (path, response.status_code, response.text[:200])
    for queue in service.admission.snapshot():
        assert (queue["slotsBusy"], queue["queued"]) == (0, 0), queue
    assert sum(queue.limiter.admittedTotal for queue in service.admission.queues.values()) >= len(FAULTY_CALLS)


async def test_aFullQueueRefusesAnAnalysisBeforeRenderingTheDocument(service: Service) -> None:
    from tests.documentSamples import makePdf

    await service.hold(externalName="poweron-vision-general", count=3)
    response = await service.http.post("/api/analyze", headers=API, files={"file": ("a.pdf", makePdf(1))},
                                       data={"prompt": "Describe"})
    assert response.status_code == 503 and response.json()["code"] == "queue_full"
    assert service.app.state.renderPool.slots.admittedTotal == 0  # no worker spent a second on it


def test_refuseIfFullOnlyWhenSlotsAndQueueAreFull() -> None:
    from upstream.admission import Admission, AdmissionPolicy, AdmissionRefused

    admission = Admission(AdmissionPolicy(numParallel=1, maxQueue=1))
    admission.refuseIfFull("default", "m", "a")  # empty: no refusal
    admission.enqueue("default", "m", "a")
    admission.refuseIfFull("default", "m", "a")  # the slot is busy but the queue has room
    admission.enqueue("default", "m", "a")
    with pytest.raises(AdmissionRefused):
        admission.refuseIfFull("default", "m", "b")
