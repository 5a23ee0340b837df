"""OpenAI-compatible API for Cursor, F13/KIVA and OpenAI-SDK clients (Authorization: Bearer, OpenAI keys)."""

from __future__ import annotations

from fastapi import APIRouter

from dependencies import RegistryDep

router = APIRouter(prefix="/v1", tags=["openai"])
MODEL_OWNER = "poweron"


def _modelObject(externalName: str, created: int = 0) -> dict:
    return {"id": externalName, "object": "model", "created": created, "owned_by": MODEL_OWNER}


@router.get("/models")
async def listModels(registry: RegistryDep) -> dict:
    """The external names that are available right now."""
    return {"object": "list", "data": [_modelObject(spec.externalName) for spec in registry.availableModels()]}


@router.get("/models/{modelId}")
async def getModel(modelId: str, registry: RegistryDep) -> dict:
    """One available model, or 404."""
    if not any(spec.externalName == modelId for spec in registry.availableModels()):
        raise registry.unknownModelError(modelId)
    return _modelObject(modelId)
