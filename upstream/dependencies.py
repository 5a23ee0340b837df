"""FastAPI dependencies: settings, the Ollama client (routed over the upstream pool, one view per request) and the
model registry, all living on app.state; the model routes take the three as one (``ModelCallDep``).

They are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a worker thread, which costs a thread
hop per dependency per request (measured: most of the per-request CPU of /v1/chat/completions)."""

from __future__ import annotations

from typing import Annotated, NamedTuple

from fastapi import Depends, Request

from config import Settings
from core.requestContext import getMeta
from upstream.modelRegistry import ModelRegistry
from upstream.routing import RoutedOllama


async def getSettings(request: Request) -> Settings:
    return request.app.state.settings


async def getRegistry(request: Request) -> ModelRegistry:
    return request.app.state.registry


class ModelCall(NamedTuple):
    """What a model route needs (settings, registry, the routed upstream), resolved as one dependency: FastAPI
    resolves each dependency with a full pass (parameters, cache key, scopes), so the model routes (chat,
    embeddings, analysis, text) take this one instead of three
    (docu/performance.md, "Stalls under load", third session)."""

    settings: Settings
    registry: ModelRegistry
    ollama: RoutedOllama


async def getModelCall(request: Request) -> ModelCall:
    """``ollama`` is the upstream pool as a view for this request: each model call goes to the upstream routing
    picks, where it passes that upstream's admission control under the request's key name."""
    state = request.app.state
    return ModelCall(state.settings, state.registry, RoutedOllama(state.pool, getMeta(request)))


SettingsDep = Annotated[Settings, Depends(getSettings)]
RegistryDep = Annotated[ModelRegistry, Depends(getRegistry)]
ModelCallDep = Annotated[ModelCall, Depends(getModelCall)]
