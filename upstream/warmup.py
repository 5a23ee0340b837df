"""Model warm-up: the ``[warmup] models`` are loaded into each Ollama upstream that has them pulled, at start and
whenever an upstream comes back after being unreachable (a restart) or joins on a reload, in the background, so
the first user does not pay the cold load.

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
from upstream.discovery import UpstreamNode
from upstream.modelRegistry import ModelRegistry

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
    """Registry listener that preloads the configured models; one background run at a time per upstream."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The latest warm-up started (of any upstream)."""
        return next(reversed(self.tasks.values()), None)

    async def onRefresh(self, registry: ModelRegistry, cameBack: bool) -> None:
        """After a registry refresh: warm up each upstream that is reachable again (or for the first time)."""
        if not cameBack or not self.settings.warmupModels:
            return
        for node in registry.cameBackNodes:
            self.start(registry, node)

    def start(self, registry: ModelRegistry, node: UpstreamNode) -> None:
        running = self.tasks.pop(node.name, None)
        if running is not None and not running.done():
            running.cancel()
        self.tasks[node.name] = asyncio.create_task(self.warmAll(registry, node), name=f"model-warmup-{node.name}")

    async def warmAll(self, registry: ModelRegistry, node: UpstreamNode) -> None:
        """Load the configured models one after the other (parallel loads would compete for VRAM)."""
        for externalName in self.settings.warmupModels:
            try:
                await self.warmOne(registry, node, externalName)
            except ServiceError as exc:
                logger.warning("warm-up of %s at %s failed: %s", externalName, node.name, exc.message)
            except Exception:
                logger.exception("warm-up of %s at %s failed", externalName, node.name)

    async def warmOne(self, registry: ModelRegistry, node: UpstreamNode, externalName: str) -> bool:
        """Load one model; False (with a log line) when it is unknown, not served by Ollama or not pulled there."""
        spec = resolveModel(self.settings, externalName)
        if spec is None or spec.backend != "ollama":
            logger.warning("warm-up: %s is not an Ollama model of MODEL_MAPPING; skipped", externalName)
            return False
        pulledName = node.pulledNameFor(spec.ollamaName)
        if pulledName is None:
            logger.info("warm-up: %s (%s) is not pulled at %s; skipped", externalName, spec.ollamaName, node.name)
            return False
        window = await registry.windowOf(spec, pulledName, node)
        path, payload = warmupRequest(spec, pulledName, self.settings.ollama.keep_alive, window)
        startedAt = time.perf_counter()
        await node.client.postJson(path, payload, externalName)
        node.noteServed(pulledName, window or None)
        logger.info("warm-up: %s (%s) loaded at %s in %.1f s", externalName, pulledName, node.name,
                    time.perf_counter() - startedAt)
        return True

    async def close(self) -> None:
        """Stop warm-ups still running (at shutdown)."""
        for task in self.tasks.values():
            if not task.done():
                task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
