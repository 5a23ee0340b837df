"""Live model discovery: which MODEL_MAPPING entries are pulled in Ollama (and whether whisper answers), with
capabilities. Refreshed in the background so no request waits on discovery."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from config import ModelSpec, Settings, resolveModel
from core.errors import ServiceError
from upstream.contextWindow import TokenEstimator, modelWindow
from upstream.discovery import (
    PROBE_TIMEOUT_SECONDS,
    PulledModel,
    UpstreamNode,
    normaliseModelName,
    parsePulledModels,
    pulledNameIn,
)
from upstream.ollamaClient import OllamaClient, UpstreamError
from upstream.ollamaVersion import OllamaFeatures, imagePixelBudget
from upstream.pool import UpstreamPool

__all__ = ["ModelRegistry", "PulledModel", "ResolvedModel", "contextLengthOf", "normaliseModelName",
           "parsePulledModels", "pulledNameIn"]

logger = logging.getLogger("poweron.models")
RETRY_WHEN_DOWN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """An external name resolved to the pulled Ollama model that serves it."""

    spec: ModelSpec
    ollamaName: str
    capabilities: frozenset[str]
    contextLength: int = 0
    """The model's own context length from /api/show (0 = unknown)."""
    window: int = 0
    """The num_ctx every request and the warm-up send for this model (upstream/contextWindow.py)."""
    features: OllamaFeatures = OllamaFeatures((0, 0, 0))
    """What the daemon's version can do (upstream/ollamaVersion.py)."""

    @property
    def externalName(self) -> str:
        return self.spec.externalName

    def pixelBudget(self, default: int) -> int:
        """Pixels per image for this model on this daemon version."""
        return imagePixelBudget(self.spec.maxImagePixels or default, self.ollamaName, self.features)


def contextLengthOf(shown: dict[str, Any]) -> int:
    """``<family>.context_length`` from /api/show's model_info (0 when absent)."""
    info = shown.get("model_info")
    if not isinstance(info, dict):
        return 0
    for key, value in info.items():
        if key.endswith(".context_length") and isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


class ModelRegistry:
    """Cached view of the models the Ollama upstreams have pulled (a model is available while any upstream that
    takes requests has it) and of the whisper service's health."""

    def __init__(self, settings: Settings, ollama: OllamaClient | UpstreamPool, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.pool = ollama if isinstance(ollama, UpstreamPool) else UpstreamPool.fromClient(settings, ollama)
        self.http = http
        self.capabilityCache: dict[tuple[str, str], frozenset[str]] = {}
        self.contextCache: dict[tuple[str, str], int] = {}
        self.tokens = TokenEstimator()
        self.whisperReachable = False
        self.lastRefresh = 0.0
        self.refreshCount = 0
        self.cameBackNodes: list[UpstreamNode] = []
        """Upstreams that answered the last refresh after not answering before (the warm-up loads them)."""
        self.listeners: list[Any] = []
        """Callables ``async f(registry, cameBack: bool)`` run after each refresh (e.g. warm-up)."""

    @property
    def ollamaReachable(self) -> bool:
        """True while at least one configured upstream answers."""
        return any(node.reachable for node in self.pool.active())

    @property
    def ollamaVersion(self) -> str | None:
        return next((node.version for node in self.pool.active() if node.reachable), None)

    @property
    def ollamaError(self) -> str | None:
        """None while an upstream answers; else why (one upstream: its reason; several: each named)."""
        nodes = self.pool.active()
        if any(node.reachable for node in nodes):
            return None
        if len(nodes) == 1:
            return nodes[0].error
        return "; ".join(f"{node.name}: {node.error}" for node in nodes) or "no upstream configured"

    async def refresh(self) -> None:
        """Read every upstream's /api/tags, /api/version, /api/ps (and whisper's /health) once; never raises."""
        try:
            cameBack, _ = await asyncio.gather(self.pool.refreshAll(), self._refreshWhisper())
            await self._prefetchCapabilities()
        except Exception as exc:  # a malformed answer must not stop discovery for good
            logger.exception("model discovery failed")
            cameBack = []
            for node in self.pool.active():
                node.markDown(f"model discovery failed ({type(exc).__name__})")
        self.lastRefresh = time.monotonic()
        self.refreshCount += 1
        self.cameBackNodes = cameBack
        for listener in self.listeners:
            try:
                await listener(self, bool(cameBack))
            except Exception:
                logger.exception("model registry listener failed")

    async def _refreshWhisper(self) -> None:
        if not self.settings.whisper.enabled:
            self.whisperReachable = False
            return
        url = self.settings.whisper.base_url.rstrip("/") + "/health"
        try:
            response = await self.http.get(url, timeout=PROBE_TIMEOUT_SECONDS)
            self.whisperReachable = response.status_code == 200
        except httpx.HTTPError:
            self.whisperReachable = False

    async def _prefetchCapabilities(self) -> None:
        for node in self.pool.active():
            if not node.reachable:
                continue
            for spec in self.settings.modelMapping.values():
                pulledName = node.pulledNameFor(spec.ollamaName)
                if pulledName:
                    try:
                        await self._capabilitiesAt(node, pulledName)
                    except ServiceError as exc:
                        logger.warning("capabilities of %s at %s unknown: %s", pulledName, node.name, exc.message)

    async def run(self) -> None:
        """Refresh forever (after the first refresh): every discovery_ttl seconds, every second while an upstream
        is down (so it returns to rotation by itself soon after it answers again)."""
        while True:
            allUp = all(node.reachable for node in self.pool.active())
            await asyncio.sleep(self.settings.ollama.discovery_ttl if allUp
                                else min(RETRY_WHEN_DOWN_SECONDS, self.settings.ollama.discovery_ttl))
            await self.refresh()

    def _serving(self, spec: ModelSpec) -> list[tuple[UpstreamNode, str]]:
        """(upstream, pulled name) for each upstream taking requests that has the model."""
        if spec.backend != "ollama":
            return []
        found = []
        for node in self.pool.active():
            pulledName = node.pulledNameFor(spec.ollamaName) if node.routable else None
            if pulledName is not None:
                found.append((node, pulledName))
        return found

    def _nodeWith(self, pulledName: str) -> UpstreamNode | None:
        return next((node for node in self.pool.active()
                     if node.reachable and normaliseModelName(pulledName) in node.pulled), None)

    def pulledNameFor(self, spec: ModelSpec) -> str | None:
        serving = self._serving(spec)
        return serving[0][1] if serving else None

    def isAvailable(self, spec: ModelSpec) -> bool:
        """True while the model can serve requests now."""
        if spec.backend == "whisper":
            return self.whisperReachable
        return bool(self._serving(spec))

    def availableModels(self) -> list[ModelSpec]:
        return [spec for spec in self.settings.modelMapping.values() if self.isAvailable(spec)]

    @property
    def features(self) -> OllamaFeatures:
        """What the oldest reachable upstream's version can do (every upstream may serve a request)."""
        versions = [OllamaFeatures.of(node.version) for node in self.pool.active() if node.reachable]
        return min(versions, key=lambda features: features.version) if versions else OllamaFeatures.of(None)

    async def capabilitiesOf(self, pulledName: str, node: UpstreamNode | None = None) -> frozenset[str]:
        """Capabilities from /api/tags when it lists them, else /api/show, cached per name and digest."""
        node = node or self._nodeWith(pulledName)
        if node is None:
            return frozenset({"completion"})
        return await self._capabilitiesAt(node, pulledName)

    async def _capabilitiesAt(self, node: UpstreamNode, pulledName: str) -> frozenset[str]:
        entry = node.pulled.get(normaliseModelName(pulledName))
        cacheKey = (pulledName, entry.digest if entry else "")
        if cacheKey not in self.contextCache:
            try:
                await self._show(node, pulledName, cacheKey)
            except ServiceError:
                if entry is None or entry.capabilities is None:
                    raise  # without /api/show nothing is known
                self.contextCache[cacheKey] = 0  # /api/tags listed the capabilities: the window stays uncapped
        if entry is not None and entry.capabilities is not None:
            return entry.capabilities
        return self.capabilityCache.get(cacheKey) or frozenset({"completion"})

    async def _show(self, node: UpstreamNode, pulledName: str, cacheKey: tuple[str, str]) -> None:
        """/api/show once per name and digest: capabilities and the model's own context length."""
        shown = await node.client.show(pulledName, PROBE_TIMEOUT_SECONDS * 5)
        listed = shown.get("capabilities")
        self.capabilityCache[cacheKey] = frozenset(c for c in listed if isinstance(c, str)) if isinstance(
            listed, list) else frozenset({"completion"})
        self.contextCache[cacheKey] = contextLengthOf(shown)

    def _contextLength(self, node: UpstreamNode, pulledName: str) -> int:
        entry = node.pulled.get(normaliseModelName(pulledName))
        return self.contextCache.get((pulledName, entry.digest if entry else ""), 0)

    async def windowOf(self, spec: ModelSpec, pulledName: str, node: UpstreamNode | None = None) -> int:
        """The num_ctx for this model (the same on every route, every upstream and in the warm-up)."""
        node = node or self._nodeWith(pulledName)
        if node is None:
            return modelWindow(self.settings, spec, 0, spec.type == "vision")
        capabilities = await self._capabilitiesAt(node, pulledName)
        return modelWindow(self.settings, spec, self._contextLength(node, pulledName), "vision" in capabilities)

    def cachedCapabilities(self, spec: ModelSpec) -> frozenset[str] | None:
        """Capabilities without any upstream call (None when not known yet)."""
        for node, pulledName in self._serving(spec):
            entry = node.pulled.get(normaliseModelName(pulledName))
            if entry is not None and entry.capabilities is not None:
                return entry.capabilities
            cached = self.capabilityCache.get((pulledName, entry.digest if entry else ""))
            if cached is not None:
                return cached
        return None

    def unknownModelError(self, externalName: str) -> ServiceError:
        available = ", ".join(spec.externalName for spec in self.availableModels()) or "none right now"
        return ServiceError(404, f"The model `{externalName}` does not exist. Available models: {available}",
                            code="model_not_found", param="model")

    def _unreachableError(self) -> UpstreamError:
        nodes = self.pool.active()
        message = "Ollama is not reachable" if len(nodes) == 1 else (
            "No Ollama upstream is reachable (" + ", ".join(node.name for node in nodes) + ")")
        return UpstreamError(503, message, code="upstream_unavailable", headers={"Retry-After": "2"})

    def _notServedError(self, spec: ModelSpec, externalName: str) -> ServiceError:
        if any(node.reachable and node.pulledNameFor(spec.ollamaName) for node in self.pool.active()):
            return self.pool.noUpstreamError(spec.ollamaName)  # pulled only where draining or removed
        logger.warning("%s is configured but not pulled: ollama pull %s", externalName, spec.ollamaName)
        return ServiceError(404, f"The model `{externalName}` is configured but not available yet (its Ollama "
                            "model is not pulled); the operator's log names what to pull",
                            code="model_not_found", param="model")

    async def resolve(self, externalName: str) -> ResolvedModel:
        """Resolve an external name for a request: 404 unknown/not pulled, 503 upstreams down or draining."""
        spec = resolveModel(self.settings, externalName)
        if spec is None:
            raise self.unknownModelError(externalName)
        if spec.backend == "whisper":
            if not self.whisperReachable:
                raise UpstreamError(503, "The speech-to-text service is not reachable", code="upstream_unavailable",
                                    headers={"Retry-After": "5"})
            return ResolvedModel(spec, "", frozenset({"stt"}))
        if not self.ollamaReachable:
            raise self._unreachableError()
        serving = self._serving(spec)
        if not serving:
            raise self._notServedError(spec, externalName)
        node, pulledName = serving[0]
        capabilities = await self._capabilitiesAt(node, pulledName)
        contextLength = self._contextLength(node, pulledName)
        window = modelWindow(self.settings, spec, contextLength, "vision" in capabilities)
        return ResolvedModel(spec, pulledName, capabilities, contextLength, window, self.features)
