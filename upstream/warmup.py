"""Model warm-up: the ``[warmup] models`` are loaded into Ollama at start and whenever Ollama comes back after being
unreachable (a restart), in the background, so the first user does not pay the cold load.

A chat model gets Ollama's load request (``/api/chat`` with ``messages: []``), an embedding model a one-word
``/api/embed``; both carry ``[ollama] keep_alive`` and the model's ``num_ctx`` (the same runner options as every
request, or Ollama would reload the model at the first request). Only metadata (model names, timings) is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from config import ModelSpec, Settings, resolveModel
from core.errors import ServiceError
from upstream.contextWindow import runnerOptions
from upstream.modelRegistry import ModelRegistry
from upstream.ollamaClient import OllamaClient

logger = logging.getLogger("poweron.warmup")
WARMUP_EMBED_INPUT = "warm-up"


def warmupRequest(spec: ModelSpec, pulledName: str, keepAlive: str, window: int = 0) -> tuple[str, dict[str, Any]]:
    """Path and payload that load ``pulledName`` into memory (with the model's window) without generating."""
    options = runnerOptions(window)
    if spec.type == "embedding":
        payload = {"model": pulledName, "input": WARMUP_EMBED_INPUT, "keep_alive": keepAlive}
        return "/api/embed", {**payload, "options": options} if options else payload
    payload = {"model": pulledName, "messages": [], "keep_alive": keepAlive}
    return "/api/chat", {**payload, "options": options} if options else payload


class ModelWarmup:
    """Registry listener that preloads the configured models; one background run at a time."""

    def __init__(self, settings: Settings, ollama: OllamaClient) -> None:
        self.settings = settings
        self.ollama = ollama
        self.task: asyncio.Task[None] | None = None

    async def onRefresh(self, registry: ModelRegistry, cameBack: bool) -> None:
        """After a registry refresh: start a warm-up when Ollama is reachable again (or for the first time)."""
        if not cameBack or not self.settings.warmupModels:
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.task = asyncio.create_task(self.warmAll(registry), name="model-warmup")

    async def warmAll(self, registry: ModelRegistry) -> None:
        """Load the configured models one after the other (parallel loads would compete for VRAM)."""
        for externalName in self.settings.warmupModels:
            try:
                await self.warmOne(registry, externalName)
            except ServiceError as exc:
                logger.warning("warm-up of %s failed: %s", externalName, exc.message)
            except Exception:
                logger.exception("warm-up of %s failed", externalName)

    async def warmOne(self, registry: ModelRegistry, externalName: str) -> bool:
        """Load one model; False (with a log line) when it is unknown, not served by Ollama or not pulled."""
        spec = resolveModel(self.settings, externalName)
        if spec is None or spec.backend != "ollama":
            logger.warning("warm-up: %s is not an Ollama model of MODEL_MAPPING; skipped", externalName)
            return False
        pulledName = registry.pulledNameFor(spec)
        if pulledName is None:
            logger.warning("warm-up: %s (%s) is not pulled in Ollama; skipped", externalName, spec.ollamaName)
            return False
        window = await registry.windowOf(spec, pulledName)
        path, payload = warmupRequest(spec, pulledName, self.settings.ollama.keep_alive, window)
        startedAt = time.perf_counter()
        await self.ollama.postJson(path, payload, externalName)
        logger.info("warm-up: %s (%s) loaded in %.1f s", externalName, pulledName, time.perf_counter() - startedAt)
        return True

    async def close(self) -> None:
        """Stop a warm-up still running (at shutdown)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
