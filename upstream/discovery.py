"""What one Ollama daemon offers: pulled models (/api/tags, capabilities), its version, and which models it has
loaded (/api/ps: context window, VRAM, expiry), refreshed in the background by the pool. Names only, no content."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from config import isCloudModelName
from core.errors import ServiceError
from upstream.ollamaClient import OllamaClient

logger = logging.getLogger("poweron.models")
PROBE_TIMEOUT_SECONDS = 2.0
MODEL_NAME_CACHE_SIZE = 1024
"""Normalised model names remembered (names come from the configuration, Ollama's lists and requests)."""


@dataclass(frozen=True, slots=True)
class PulledModel:
    """One local model from /api/tags."""

    name: str
    digest: str
    capabilities: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """One model in memory, from /api/ps (or from a request this service just had answered)."""

    name: str
    contextLength: int
    sizeVram: int
    expiresAt: str


@lru_cache(maxsize=MODEL_NAME_CACHE_SIZE)
def normaliseModelName(name: str) -> str:
    """Lower-case ``name:tag`` with the implicit ``:latest`` and the default registry prefix removed (remembered:
    a request normalises the same few names about ten times)."""
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name if ":" in name.rpartition("/")[2] else name + ":latest"


def isCloudEntry(entry: dict[str, Any]) -> bool:
    """Entries served by ollama.com: a cloud tag, or remote_host/remote_model set."""
    return isCloudModelName(str(entry.get("name", ""))) or bool(entry.get("remote_host") or entry.get("remote_model"))


def pulledNameIn(pulled: dict[str, PulledModel], ollamaName: str) -> str | None:
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


def _intOf(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parseLoadedModels(answer: Any) -> dict[str, LoadedModel]:
    """/api/ps as ``{normalised name: LoadedModel}``; anything malformed is left out."""
    entries = answer.get("models") if isinstance(answer, dict) else None
    loaded: dict[str, LoadedModel] = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or isCloudEntry(entry):
            continue
        name = str(entry.get("name") or entry.get("model") or "")
        if name:
            loaded[normaliseModelName(name)] = LoadedModel(name, _intOf(entry.get("context_length")),
                                                           _intOf(entry.get("size_vram")),
                                                           str(entry.get("expires_at") or ""))
    return loaded


class UpstreamNode:
    """One named Ollama daemon: its client, what discovery saw last, and what this service has in flight there."""

    def __init__(self, name: str, url: str, client: OllamaClient, draining: bool = False) -> None:
        self.name, self.url, self.client, self.draining = name, url, client, draining
        self.removed = False
        self.pulled: dict[str, PulledModel] = {}
        self.loaded: dict[str, LoadedModel] = {}
        self.reachable = False
        self.version: str | None = None
        self.error: str | None = "not checked yet"
        self.lastRefresh = 0.0
        self.capabilityCache: dict[tuple[str, str], frozenset[str]] = {}
        self.onDown: Callable[[UpstreamNode], None] | None = None
        """Called when the upstream is marked down (the pool moves the requests waiting for it elsewhere)."""
        self.inFlight = 0
        self.inFlightByModel: collections.Counter[str] = collections.Counter()
        self.picks = 0

    @property
    def routable(self) -> bool:
        """Takes new requests: reachable, not draining, still configured."""
        return self.reachable and not self.draining and not self.removed

    async def refresh(self) -> None:
        """Read /api/version, /api/tags and /api/ps once; a failure marks the upstream unreachable."""
        try:
            version, entries = await asyncio.gather(self.client.version(PROBE_TIMEOUT_SECONDS),
                                                    self.client.tags(PROBE_TIMEOUT_SECONDS))
            pulled = parsePulledModels(entries)
        except ServiceError as exc:
            self.markDown(exc.message)
            return
        finally:
            self.lastRefresh = time.monotonic()
        self.pulled = pulled
        if not self.reachable and self.error != "not checked yet":
            logger.warning("ollama upstream %s is reachable again", self.name)
        self.reachable, self.version, self.error = True, version, None
        try:
            self.loaded = parseLoadedModels(await self.client.getJson("/api/ps", PROBE_TIMEOUT_SECONDS))
        except Exception as exc:  # an old daemon without /api/ps still serves; residency is then unknown
            logger.debug("/api/ps of %s unusable: %s", self.name, type(exc).__name__)
            self.loaded = {}

    def markDown(self, reason: str) -> None:
        """Out of rotation until a probe sees it answer again (no request waits on it meanwhile)."""
        if self.reachable:
            logger.warning("ollama upstream %s unreachable: %s", self.name, reason)
        self.reachable, self.error = False, reason
        if self.onDown is not None:
            self.onDown(self)

    def pulledNameFor(self, ollamaName: str) -> str | None:
        return pulledNameIn(self.pulled, ollamaName)

    def isLoaded(self, pulledName: str, numCtx: int | None) -> bool:
        """Loaded with the runner options a request would keep (its num_ctx), so no reload is needed."""
        entry = self.loaded.get(normaliseModelName(pulledName))
        if entry is None:
            return False
        return not numCtx or not entry.contextLength or entry.contextLength == numCtx

    def noteServed(self, pulledName: str, numCtx: int | None) -> None:
        """A request was answered: the model is loaded now (until the next /api/ps says otherwise)."""
        key = normaliseModelName(pulledName)
        if key not in self.loaded or not self.isLoaded(pulledName, numCtx):
            self.loaded = {**self.loaded, key: LoadedModel(pulledName, numCtx or 0, 0, "")}

    def describe(self, slots: int) -> dict[str, Any]:
        """The keyed /health entry: name and state, never the URL."""
        return {"name": self.name, "reachable": self.reachable, "draining": self.draining,
                "version": self.version, "reason": self.error,
                "modelsPulled": sorted(entry.name for entry in self.pulled.values()),
                "modelsLoaded": [{"name": entry.name, "contextLength": entry.contextLength or None,
                                  "sizeVram": entry.sizeVram or None, "expiresAt": entry.expiresAt or None}
                                 for entry in self.loaded.values()],
                "inFlight": self.inFlight, "slotsBusy": {name: min(count, slots)
                                                        for name, count in self.inFlightByModel.items() if count},
                "queued": sum(max(0, count - slots) for count in self.inFlightByModel.values())}
