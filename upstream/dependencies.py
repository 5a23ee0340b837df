"""FastAPI dependencies: settings, the Ollama client (routed over the upstream pool, one view per request) and the
model registry, all living on app.state.

They are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a worker thread, which costs a thread
hop per dependency per request (measured: most of the per-request CPU of /v1/chat/completions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from config import Settings
from core.requestContext import getMeta
from upstream.modelRegistry import ModelRegistry
from upstream.routing import RoutedOllama


async def getSettings(request: Request) -> Settings:
    return request.app.state.settings


async def getOllama(request: Request) -> RoutedOllama:
    """The upstream pool, as a view for this request: each model call goes to the upstream routing picks, where
    it passes that upstream's admission control under the request's key name."""
    return RoutedOllama(request.app.state.pool, getMeta(request))


async def getRegistry(request: Request) -> ModelRegistry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(getSettings)]
OllamaDep = Annotated[RoutedOllama, Depends(getOllama)]
RegistryDep = Annotated[ModelRegistry, Depends(getRegistry)]
