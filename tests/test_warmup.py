"""Model warm-up: the configured models are preloaded at start and again after Ollama comes back, in the background."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from app import createApp
from config import MODEL_MAPPING
from tests.ollamaStub import StubServer
from upstream.warmup import ModelWarmup, warmupRequest

WAIT_SECONDS = 20.0


def waitFor(condition: Any, what: str) -> Any:
    """Poll until condition() is truthy; the deadline only guards against hanging, nothing is timed."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stubEvents(stub: StubServer, kind: str) -> list[dict]:
    return httpx.get(stub.url(f"/_stub/events?type={kind}")).json()["events"]


def stubRequests(stub: StubServer, path: str) -> list[dict]:
    return httpx.get(stub.url(f"/_stub/requests?path={path}")).json()["requests"]


@pytest.fixture
def stub():
    server = StubServer(models=["qwen2.5:7b", "nomic-embed-text"]).start()
    yield server
    server.stop()


def test_chatModelsGetOllamasLoadRequestWithTheModelsWindow():
    path, payload = warmupRequest(MODEL_MAPPING["poweron-vision-general"], "qwen2.5vl:7b", "30m", 8192)
    assert (path, payload) == ("/api/chat", {"model": "qwen2.5vl:7b", "messages": [], "keep_alive": "30m",
                                             "options": {"num_ctx": 8192}})


def test_embeddingModelsGetATinyEmbedRequest():
    path, payload = warmupRequest(MODEL_MAPPING["poweron-embed"], "nomic-embed-text:latest", "24h", 2048)
    assert path == "/api/embed"
    assert payload == {"model": "nomic-embed-text:latest", "input": "warm-up", "keep_alive": "24h",
                       "options": {"num_ctx": 2048}}


async def test_startupPreloadsTheConfiguredModelsThatArePulled(stub, makeSettings):
    settings = makeSettings(ollama={"base_url": stub.baseUrl, "keep_alive": "45m"},
                            warmup={"models": "poweron-text-general, poweron-embed, poweron-vision-general, "
                                              "poweron-transcribe, no-such-model"})
    app = createApp(settings)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.warmup.task, WAIT_SECONDS)
    chats = [r["body"] for r in stubRequests(stub, "/api/chat")]
    embeds = [r["body"] for r in stubRequests(stub, "/api/embed")]
    assert chats == [{"model": "qwen2.5:7b", "messages": [], "keep_alive": "45m", "options": {"num_ctx": 8192}}]
    # nomic-embed-text's own context length (2048 in /api/show) caps [ollama] num_ctx
    assert embeds == [{"model": "nomic-embed-text:latest", "input": "warm-up", "keep_alive": "45m",
                       "options": {"num_ctx": 2048}}]
    assert [event["model"] for event in stubEvents(stub, "load")] == ["qwen2.5:7b"]


async def test_noWarmupWhenTheListIsEmpty(stub, makeSettings):
    app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}, warmup={"models": ""}))
    async with app.router.lifespan_context(app):
        assert app.state.registry.ollamaReachable
        assert app.state.warmup.task is None
    assert stubRequests(stub, "/api/chat") == []


class FakeNode:
    """An upstream whose every model is pulled, talking to the given client."""

    def __init__(self, client: Any, name: str = "default") -> None:
        self.client, self.name = client, name

    def pulledNameFor(self, ollamaName: str) -> str:
        return ollamaName

    def noteServed(self, pulledName: str, numCtx: int | None) -> None:
        pass


class FakeRegistry:
    def __init__(self, client: Any) -> None:
        self.cameBackNodes = [FakeNode(client)]

    async def windowOf(self, spec: Any, pulledName: str, node: Any = None) -> int:
        return 8192


class BlockingOllama:
    """postJson waits until released, like a model load that takes minutes."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[tuple[str, dict]] = []

    async def postJson(self, path: str, payload: dict, externalName: str | None = None) -> dict:
        self.calls.append((path, payload))
        await self.release.wait()
        return {"done": True}


async def test_warmupRunsInTheBackgroundAndOnlyWhenOllamaCameBack(makeSettings):
    ollama = BlockingOllama()
    warmup = ModelWarmup(makeSettings(warmup={"models": "poweron-text-general"}))
    await warmup.onRefresh(FakeRegistry(ollama), cameBack=False)  # type: ignore[arg-type]
    assert warmup.task is None
    await warmup.onRefresh(FakeRegistry(ollama), cameBack=True)  # type: ignore[arg-type]
    assert warmup.task is not None and not warmup.task.done()  # the listener returned while the load is pending
    await asyncio.sleep(0)
    assert ollama.calls == [("/api/chat", {"model": "qwen2.5:7b", "messages": [], "keep_alive": "30m",
                                           "options": {"num_ctx": 8192}})]
    ollama.release.set()
    await asyncio.wait_for(warmup.task, WAIT_SECONDS)


async def test_aNewComebackReplacesAWarmupStillRunning(makeSettings):
    ollama = BlockingOllama()
    warmup = ModelWarmup(makeSettings(warmup={"models": "poweron-text-general"}))
    await warmup.onRefresh(FakeRegistry(ollama), cameBack=True)  # type: ignore[arg-type]
    first = warmup.task
    await asyncio.sleep(0)
    await warmup.onRefresh(FakeRegistry(ollama), cameBack=True)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert first is not None and first.cancelled()
    await warmup.close()
    assert warmup.task is not None and warmup.task.done()


@pytest.mark.e2e
def test_serviceWarmsUpAtStartAndAgainAfterOllamaRestarts(stub, serviceFactory):
    service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
                              "PRIVATE_LLM_WARMUP__MODELS": "poweron-text-general"})
    waitFor(lambda: stubEvents(stub, "load"), "the warm-up at start")
    assert stubEvents(stub, "load")[0]["model"] == "qwen2.5:7b"

    stub.stop()
    waitFor(lambda: httpx.get(service.baseUrl + "/health/readiness").status_code == 503,
            "the service to notice that Ollama is down")
    stub.state.events.clear()
    stub.state.onRestart()
    stub.start()
    events = waitFor(lambda: stubEvents(stub, "load"), "the warm-up after the restart")
    assert [event["model"] for event in events] == ["qwen2.5:7b"]
    body = stubRequests(stub, "/api/chat")[-1]["body"]
    assert body == {"model": "qwen2.5:7b", "messages": [], "keep_alive": "30m", "options": {"num_ctx": 8192}}
