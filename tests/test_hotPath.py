"""The request path of the model routes stays lean: what each request costs in framework work is fixed by their
shape (docu/performance.md, "Stalls under load", third session). The numbers themselves are measured by
``make bench``; these tests keep the shapes that make them possible."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
from fastapi.dependencies.utils import get_dependant
from prometheus_client import CollectorRegistry, Counter

import routeApi
import routeOpenAi
from core.requestContext import META_SCOPE_KEY, RequestMeta
from observe.labelCache import LabelCache
from upstream.discovery import normaliseModelName
from upstream.dependencies import ModelCall, getModelCall

MODEL_ROUTES = [routeOpenAi.chatCompletions, routeOpenAi.embeddings, routeApi.analyze, routeApi.text, routeApi.embed]


@pytest.mark.parametrize("endpoint", MODEL_ROUTES, ids=lambda endpoint: endpoint.__name__)
def test_modelRoutesResolveOneDependencyBesidesTheKey(endpoint) -> None:
    """FastAPI resolves each dependency with a full pass (params, cache key, scopes): one bundle, not three."""
    dependant = get_dependant(path="/x", call=endpoint)
    assert [sub.call for sub in dependant.dependencies] == [getModelCall]
    assert list(inspect.signature(endpoint).parameters) == ["request", "call"]


async def test_modelCallIsAViewForTheRequest() -> None:
    """Each request gets its own routed view with its own meta (its key name goes to admission), over the app's
    one pool, settings and registry."""
    state = SimpleNamespace(settings=object(), registry=object(), pool=object())
    app = SimpleNamespace(state=state)
    metas = [RequestMeta("a", "POST", "/v1/chat/completions"), RequestMeta("b", "POST", "/api/text")]
    first, second = [await getModelCall(SimpleNamespace(app=app, scope={META_SCOPE_KEY: meta})) for meta in metas]
    assert isinstance(first, ModelCall)
    assert first.settings is state.settings and first.registry is state.registry
    assert first.ollama is not second.ollama
    assert first.ollama.pool is second.ollama.pool is state.pool
    assert (first.ollama.meta, second.ollama.meta) == (metas[0], metas[1])


def test_labelCacheLooksUpEachLabelSetOnce() -> None:
    """A request's metrics reuse the labelled children; what they count is unchanged."""
    registry = CollectorRegistry()
    counter = Counter("poweron_x", "x", ["a"], registry=registry)
    lookups: list[tuple[str, ...]] = []
    original = counter.labels
    counter.labels = lambda *values: lookups.append(values) or original(*values)
    cache = LabelCache()
    for value in ("1", "1", "2", "1"):
        cache(counter, value).inc()
    assert lookups == [("1",), ("2",)]
    assert registry.get_sample_value("poweron_x_total", {"a": "1"}) == 3
    assert registry.get_sample_value("poweron_x_total", {"a": "2"}) == 1


def test_modelNamesAreNormalisedOncePerName() -> None:
    """The same answer as before, computed once per distinct name."""
    normaliseModelName.cache_clear()
    assert normaliseModelName("Registry.Ollama.AI/library/Qwen2.5") == "qwen2.5:latest"
    assert normaliseModelName("Registry.Ollama.AI/library/Qwen2.5") == "qwen2.5:latest"
    assert normaliseModelName("namespace/model:7b") == "namespace/model:7b"
    assert normaliseModelName.cache_info().misses == 2
