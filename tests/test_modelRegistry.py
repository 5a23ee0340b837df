"""Model discovery: name matching, cloud exclusion, capabilities, unreachable Ollama (respx)."""

from __future__ import annotations

import httpx
import pytest
import respx

from core.errors import ServiceError
from upstream.discovery import pulledNameIn as _isModelAvailableInOllama
from upstream.modelRegistry import ModelRegistry, normaliseModelName, parsePulledModels
from upstream.ollamaClient import OllamaClient, createHttpClient

OLLAMA = "http://127.0.0.1:11434"


def tagEntry(name: str, **extra: object) -> dict:
    return {"name": name, "model": name, "digest": "d-" + name, "size": 1, "details": {}, **extra}


def pulledOf(*names: str) -> dict:
    return parsePulledModels([tagEntry(name) for name in names])


@pytest.mark.parametrize(("wanted", "pulled", "expected"), [
    ("qwen2.5:7b", ["qwen2.5:7b"], "qwen2.5:7b"),
    ("granite3.2-vision", ["granite3.2-vision:latest"], "granite3.2-vision:latest"),
    ("nomic-embed-text:latest", ["nomic-embed-text"], "nomic-embed-text"),
    ("qwen2.5:7b", ["qwen2.5:7b-instruct-q4_K_M"], "qwen2.5:7b-instruct-q4_K_M"),
    ("qwen2.5:7b", ["qwen2.5:70b"], None),
    ("qwen2.5:7b", ["qwen2.5vl:7b"], None),
    ("qwen2.5", ["qwen2.5:7b"], None),
    ("Qwen2.5:7B", ["qwen2.5:7b"], "qwen2.5:7b"),
    ("qwen3-coder:cloud", ["qwen3-coder:cloud"], None),
])
def test_name_matching(wanted: str, pulled: list[str], expected: str | None) -> None:
    assert _isModelAvailableInOllama(pulledOf(*pulled), wanted) == expected


def test_normalise_adds_latest_and_strips_library_prefix() -> None:
    assert normaliseModelName("registry.ollama.ai/library/Llama3.2") == "llama3.2:latest"
    assert normaliseModelName("myhost:5000/ns/model") == "myhost:5000/ns/model:latest"


def test_cloud_entries_are_dropped_from_discovery() -> None:
    entries = [tagEntry("gpt-oss:120b-cloud"), tagEntry("qwen2.5:7b", remote_host="https://ollama.com:443"),
               tagEntry("mistral:7b", remote_model="mistral"), tagEntry("llama3.2:3b")]
    assert list(parsePulledModels(entries)) == ["llama3.2:3b"]


@pytest.fixture
async def registry(makeSettings):
    settings = makeSettings(ollama={"base_url": OLLAMA})
    http = createHttpClient(1.0, 5.0, 10)
    yield ModelRegistry(settings, OllamaClient(http, OLLAMA), http)
    await http.aclose()


@respx.mock
async def test_refresh_offers_only_pulled_mapped_models(registry: ModelRegistry) -> None:
    respx.get(f"{OLLAMA}/api/version").respond(json={"version": "0.33.0"})
    respx.get(f"{OLLAMA}/api/tags").respond(json={"models": [tagEntry("qwen2.5:7b", capabilities=["completion",
                                                                                                  "tools"])]})
    respx.post(f"{OLLAMA}/api/show").respond(json={"model_info": {"qwen2.context_length": 4096}})
    await registry.refresh()
    assert [spec.externalName for spec in registry.availableModels()] == ["poweron-text-general"]
    resolved = await registry.resolve("poweron-text-general")
    assert (resolved.ollamaName, resolved.capabilities) == ("qwen2.5:7b", frozenset({"completion", "tools"}))
    assert (resolved.contextLength, resolved.window) == (4096, 4096)  # [ollama] num_ctx capped by the model


@respx.mock
async def test_capabilities_come_from_show_when_tags_lack_them_and_are_cached(registry: ModelRegistry) -> None:
    respx.get(f"{OLLAMA}/api/version").respond(json={"version": "0.20.0"})
    respx.get(f"{OLLAMA}/api/tags").respond(json={"models": [tagEntry("qwen2.5vl:7b")]})
    show = respx.post(f"{OLLAMA}/api/show").respond(json={"capabilities": ["completion", "vision"]})
    await registry.refresh()
    await registry.refresh()
    resolved = await registry.resolve("poweron-vision-general")
    assert resolved.capabilities == frozenset({"completion", "vision"})
    assert show.call_count == 1


@respx.mock
async def test_cloud_model_named_in_mapping_is_never_offered(makeSettings) -> None:
    settings = makeSettings(ollama={"base_url": OLLAMA}, models={"poweron-text-general": "qwen3-coder:cloud"})
    http = createHttpClient(1.0, 5.0, 10)
    registry = ModelRegistry(settings, OllamaClient(http, OLLAMA), http)
    respx.get(f"{OLLAMA}/api/version").respond(json={"version": "0.33.0"})
    respx.get(f"{OLLAMA}/api/tags").respond(json={"models": [tagEntry("qwen3-coder:cloud")]})
    await registry.refresh()
    assert registry.availableModels() == []
    with pytest.raises(ServiceError) as info:
        await registry.resolve("poweron-text-general")
    assert info.value.status == 404
    await http.aclose()


@respx.mock
async def test_unreachable_ollama_makes_resolve_fail_fast_with_503(registry: ModelRegistry) -> None:
    respx.get(f"{OLLAMA}/api/version").mock(side_effect=httpx.ConnectError("refused"))
    respx.get(f"{OLLAMA}/api/tags").mock(side_effect=httpx.ConnectError("refused"))
    await registry.refresh()
    assert not registry.ollamaReachable
    assert registry.ollamaError == "Ollama is not reachable"
    with pytest.raises(ServiceError) as info:
        await registry.resolve("poweron-text-general")
    assert info.value.status == 503 and "not reachable" in info.value.message


@respx.mock
async def test_unknown_and_unpulled_models_are_404_with_guidance(registry: ModelRegistry) -> None:
    respx.get(f"{OLLAMA}/api/version").respond(json={"version": "0.33.0"})
    respx.get(f"{OLLAMA}/api/tags").respond(json={"models": []})
    await registry.refresh()
    with pytest.raises(ServiceError) as unknown:
        await registry.resolve("gpt-4")
    with pytest.raises(ServiceError) as unpulled:
        await registry.resolve("poweron-embed")
    assert unknown.value.status == 404 and "`gpt-4` does not exist" in unknown.value.message
    assert unpulled.value.status == 404 and "configured but not available yet" in unpulled.value.message
    assert "nomic-embed-text" not in unpulled.value.message


@respx.mock
async def test_listeners_hear_when_ollama_comes_back(registry: ModelRegistry) -> None:
    heard: list[bool] = []

    async def listener(_registry: ModelRegistry, cameBack: bool) -> None:
        heard.append(cameBack)

    registry.listeners.append(listener)
    version = respx.get(f"{OLLAMA}/api/version")
    tags = respx.get(f"{OLLAMA}/api/tags")
    version.respond(json={"version": "1"})
    tags.respond(json={"models": []})
    await registry.refresh()
    version.mock(side_effect=httpx.ConnectError("down"))
    await registry.refresh()
    version.mock(side_effect=None)
    version.respond(json={"version": "1"})
    await registry.refresh()
    await registry.refresh()
    assert heard == [True, False, True, False]


@pytest.mark.parametrize(("tagsBody", "reachable", "available"), [
    ({"models": ["qwen2.5:7b", 3, None, {"name": "qwen2.5:7b", "capabilities": ["completion", {"x": 1}]}]}, True,
     ["poweron-text-general"]),
    ({"models": "qwen2.5:7b"}, False, []),
    ([{"name": "qwen2.5:7b"}], False, []),
])
@respx.mock
async def test_malformed_tags_answers_never_break_discovery(registry: ModelRegistry, tagsBody: object,
                                                            reachable: bool, available: list[str]) -> None:
    respx.get(f"{OLLAMA}/api/version").respond(json={"version": "0.33.0"})
    respx.get(f"{OLLAMA}/api/tags").respond(json=tagsBody)
    respx.post(f"{OLLAMA}/api/show").respond(json={"capabilities": "completion"})
    await registry.refresh()
    assert registry.ollamaReachable is reachable
    assert [spec.externalName for spec in registry.availableModels()] == available
    if not reachable:
        assert registry.ollamaError == "Ollama answered /api/tags with an unexpected shape"


@respx.mock
async def test_an_unexpected_failure_in_discovery_is_contained(registry: ModelRegistry,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from upstream import discovery

    def broken(entries: object) -> dict:
        raise KeyError("surprise")

    respx.get(f"{OLLAMA}/api/version").respond(json={"version": "0.33.0"})
    respx.get(f"{OLLAMA}/api/tags").respond(json={"models": []})
    monkeypatch.setattr(discovery, "parsePulledModels", broken)
    await registry.refresh()  # must not raise
    assert not registry.ollamaReachable and "KeyError" in (registry.ollamaError or "")
    monkeypatch.undo()
    await registry.refresh()
    assert registry.ollamaReachable
