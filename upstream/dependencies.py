"""FastAPI dependencies: settings, the Ollama client and the model registry, all living on app.state.

They are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a worker thread, which costs a thread
hop per dependency per request (measured: most of the per-request CPU of /v1/chat/completions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from config import Settings
from core.requestContext import getMeta
from upstream.modelRegistry import ModelRegistry
from upstream.ollamaClient import OllamaClient


async def getSettings(request: Request) -> Settings:
    return request.app.state.settings


async def getOllama(request: Request) -> OllamaClient:
    """The shared client, as a view for this request: its model calls pass admission control under its key name."""
    return request.app.state.ollama.forRequest(getMeta(request))


async def getRegistry(request: Request) -> ModelRegistry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(getSettings)]
OllamaDep = Annotated[OllamaClient, Depends(getOllama)]
RegistryDep = Annotated[ModelRegistry, Depends(getRegistry)]
