"""Live model discovery: which MODEL_MAPPING entries are pulled in Ollama (and whether whisper answers), with
capabilities. Refreshed in the background so no request waits on discovery."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from config import ModelSpec, Settings, isCloudModelName, resolveModel
from core.errors import ServiceError
from upstream.contextWindow import TokenEstimator, modelWindow
from upstream.ollamaClient import OllamaClient, UpstreamError
from upstream.ollamaVersion import OllamaFeatures, imagePixelBudget

logger = logging.getLogger("poweron.models")
PROBE_TIMEOUT_SECONDS = 2.0
RETRY_WHEN_DOWN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PulledModel:
    """One local model from /api/tags."""

    name: str
    digest: str
    capabilities: frozenset[str] | None


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


def normaliseModelName(name: str) -> str:
    """Lower-case ``name:tag`` with the implicit ``:latest`` and the default registry prefix removed."""
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name if ":" in name.rpartition("/")[2] else name + ":latest"


def isCloudEntry(entry: dict[str, Any]) -> bool:
    """Entries served by ollama.com: a cloud tag, or remote_host/remote_model set."""
    return isCloudModelName(str(entry.get("name", ""))) or bool(entry.get("remote_host") or entry.get("remote_model"))


def _isModelAvailableInOllama(pulled: dict[str, PulledModel], ollamaName: str) -> str | None:
    """The pulled name serving ``ollamaName``: exact match (``:latest`` implied), else a variant of the same tag
    such as ``qwen2.5:7b-instruct-q4_K_M`` for ``qwen2.5:7b``. Cloud names never match."""
    if not ollamaName or isCloudModelName(ollamaName):
        return None
    wanted = normaliseModelName(ollamaName)
    if wanted in pulled:
        return pulled[wanted].name
    variantPrefix = wanted + "-"
    for key, entry in pulled.items():
        if key.startswith(variantPrefix):
            return entry.name
    return None


def contextLengthOf(shown: dict[str, Any]) -> int:
    """``<family>.context_length`` from /api/show's model_info (0 when absent)."""
    info = shown.get("model_info")
    if not isinstance(info, dict):
        return 0
    for key, value in info.items():
        if key.endswith(".context_length") and isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def parsePulledModels(entries: list[dict[str, Any]]) -> dict[str, PulledModel]:
    pulled: dict[str, PulledModel] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = str(entry.get("name") or entry.get("model") or "")
        if not name or isCloudEntry(entry):
            continue
        capabilities = entry.get("capabilities")
        pulled[normaliseModelName(name)] = PulledModel(
            name=name, digest=str(entry.get("digest", "")),
            capabilities=frozenset(c for c in capabilities if isinstance(c, str))
            if isinstance(capabilities, list) else None)
    return pulled


class ModelRegistry:
    """Cached view of Ollama's pulled models and the whisper service's health."""

    def __init__(self, settings: Settings, ollama: OllamaClient, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.ollama = ollama
        self.http = http
        self.pulled: dict[str, PulledModel] = {}
        self.capabilityCache: dict[tuple[str, str], frozenset[str]] = {}
        self.contextCache: dict[tuple[str, str], int] = {}
        self.tokens = TokenEstimator()
        self.ollamaReachable = False
        self.ollamaVersion: str | None = None
        self.ollamaError: str | None = "not checked yet"
        self.whisperReachable = False
        self.lastRefresh = 0.0
        self.refreshCount = 0
        self.listeners: list[Any] = []
        """Callables ``async f(registry, cameBack: bool)`` run after each refresh (e.g. warm-up)."""

    async def refresh(self) -> None:
        """Read /api/tags (and whisper's /health) once; never raises."""
        wasReachable = self.ollamaReachable
        try:
            await asyncio.gather(self._refreshOllama(), self._refreshWhisper())
        except Exception as exc:  # a malformed answer must not stop discovery for good
            logger.exception("model discovery failed")
            self.ollamaReachable, self.ollamaError = False, f"model discovery failed ({type(exc).__name__})"
        self.lastRefresh = time.monotonic()
        self.refreshCount += 1
        cameBack = self.ollamaReachable and (not wasReachable)
        for listener in self.listeners:
            try:
                await listener(self, cameBack)
            except Exception:
                logger.exception("model registry listener failed")

    async def _refreshOllama(self) -> None:
        try:
            version, entries = await asyncio.gather(self.ollama.version(PROBE_TIMEOUT_SECONDS),
                                                    self.ollama.tags(PROBE_TIMEOUT_SECONDS))
        except ServiceError as exc:
            if self.ollamaReachable:
                logger.warning("ollama unreachable: %s", exc.message)
            self.ollamaReachable, self.ollamaError = False, exc.message
            return
        self.pulled = parsePulledModels(entries)
        self.ollamaReachable, self.ollamaVersion, self.ollamaError = True, version, None
        await self._prefetchCapabilities()

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
        for spec in self.settings.modelMapping.values():
            pulledName = _isModelAvailableInOllama(self.pulled, spec.ollamaName)
            if pulledName:
                try:
                    await self.capabilitiesOf(pulledName)
                except ServiceError as exc:
                    logger.warning("capabilities of %s unknown: %s", pulledName, exc.message)

    async def run(self) -> None:
        """Refresh forever (after the first refresh): every discovery_ttl seconds, every second while Ollama is down."""
        while True:
            await asyncio.sleep(self.settings.ollama.discovery_ttl if self.ollamaReachable
                                else min(RETRY_WHEN_DOWN_SECONDS, self.settings.ollama.discovery_ttl))
            await self.refresh()

    def pulledNameFor(self, spec: ModelSpec) -> str | None:
        return _isModelAvailableInOllama(self.pulled, spec.ollamaName)

    def isAvailable(self, spec: ModelSpec) -> bool:
        """True while the model can serve requests now."""
        if spec.backend == "whisper":
            return self.whisperReachable
        return self.ollamaReachable and self.pulledNameFor(spec) is not None

    def availableModels(self) -> list[ModelSpec]:
        return [spec for spec in self.settings.modelMapping.values() if self.isAvailable(spec)]

    @property
    def features(self) -> OllamaFeatures:
        return OllamaFeatures.of(self.ollamaVersion)

    async def capabilitiesOf(self, pulledName: str) -> frozenset[str]:
        """Capabilities from /api/tags when it lists them, else /api/show, cached per name and digest."""
        entry = self.pulled.get(normaliseModelName(pulledName))
        cacheKey = (pulledName, entry.digest if entry else "")
        if cacheKey not in self.contextCache:
            try:
                await self._show(pulledName, cacheKey)
            except ServiceError:
                if entry is None or entry.capabilities is None:
                    raise  # without /api/show nothing is known
                self.contextCache[cacheKey] = 0  # /api/tags listed the capabilities: the window stays uncapped
        if entry is not None and entry.capabilities is not None:
            return entry.capabilities
        return self.capabilityCache.get(cacheKey) or frozenset({"completion"})

    async def _show(self, pulledName: str, cacheKey: tuple[str, str]) -> None:
        """/api/show once per name and digest: capabilities and the model's own context length."""
        shown = await self.ollama.show(pulledName, PROBE_TIMEOUT_SECONDS * 5)
        listed = shown.get("capabilities")
        self.capabilityCache[cacheKey] = frozenset(c for c in listed if isinstance(c, str)) if isinstance(
            listed, list) else frozenset({"completion"})
        self.contextCache[cacheKey] = contextLengthOf(shown)

    async def windowOf(self, spec: ModelSpec, pulledName: str) -> int:
        """The num_ctx for this model (the same on every route and in the warm-up)."""
        capabilities = await self.capabilitiesOf(pulledName)
        entry = self.pulled.get(normaliseModelName(pulledName))
        contextLength = self.contextCache.get((pulledName, entry.digest if entry else ""), 0)
        return modelWindow(self.settings, spec, contextLength, "vision" in capabilities)

    def cachedCapabilities(self, spec: ModelSpec) -> frozenset[str] | None:
        """Capabilities without any upstream call (None when not known yet)."""
        pulledName = self.pulledNameFor(spec)
        if pulledName is None:
            return None
        entry = self.pulled.get(normaliseModelName(pulledName))
        if entry is not None and entry.capabilities is not None:
            return entry.capabilities
        return self.capabilityCache.get((pulledName, entry.digest if entry else ""))

    def unknownModelError(self, externalName: str) -> ServiceError:
        available = ", ".join(spec.externalName for spec in self.availableModels()) or "none right now"
        return ServiceError(404, f"The model `{externalName}` does not exist. Available models: {available}",
                            code="model_not_found", param="model")

    async def resolve(self, externalName: str) -> ResolvedModel:
        """Resolve an external name for a request: 404 unknown/not pulled, 503 upstream down."""
        spec = resolveModel(self.settings, externalName)
        if spec is None:
            raise self.unknownModelError(externalName)
        if spec.backend == "whisper":
            if not self.whisperReachable:
                raise UpstreamError(503, "The speech-to-text service is not reachable", code="upstream_unavailable",
                                    headers={"Retry-After": "5"})
            return ResolvedModel(spec, "", frozenset({"stt"}))
        if not self.ollamaReachable:
            raise UpstreamError(503, "Ollama is not reachable",
                                code="upstream_unavailable", headers={"Retry-After": "2"})
        pulledName = self.pulledNameFor(spec)
        if pulledName is None:
            logger.warning("%s is configured but not pulled: ollama pull %s", externalName, spec.ollamaName)
            raise ServiceError(404, f"The model `{externalName}` is configured but not available yet (its Ollama "
                               "model is not pulled); the operator's log names what to pull",
                               code="model_not_found", param="model")
        capabilities = await self.capabilitiesOf(pulledName)
        entry = self.pulled.get(normaliseModelName(pulledName))
        contextLength = self.contextCache.get((pulledName, entry.digest if entry else ""), 0)
        window = modelWindow(self.settings, spec, contextLength, "vision" in capabilities)
        return ResolvedModel(spec, pulledName, capabilities, contextLength, window, self.features)
