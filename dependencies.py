"""FastAPI dependencies: settings, the Ollama client and the model registry, all living on app.state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from config import Settings
from modelRegistry import ModelRegistry
from ollamaClient import OllamaClient


def getSettings(request: Request) -> Settings:
    return request.app.state.settings


def getOllama(request: Request) -> OllamaClient:
    return request.app.state.ollama


def getRegistry(request: Request) -> ModelRegistry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(getSettings)]
OllamaDep = Annotated[OllamaClient, Depends(getOllama)]
RegistryDep = Annotated[ModelRegistry, Depends(getRegistry)]
