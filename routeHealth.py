"""Public health probes: /health (details), /health/liveliness and /health/readiness (LiteLLM/F13 convention)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from observe import healthSchemas
from upstream.dependencies import RegistryDep

router = APIRouter(tags=["health"])


def _queues(request: Request) -> list[dict]:
    """Per upstream and model with traffic so far: slots busy / slots / queued (no key names: /health is public)."""
    admission = getattr(request.app.state, "admission", None)
    return [{"upstream": entry["upstream"], "model": entry["model"], "slotsBusy": entry["slotsBusy"],
             "slots": entry["slots"], "queued": entry["queued"]} for entry in admission.snapshot()] if admission else []


@router.get("/health", **healthSchemas.healthDoc())
async def health(request: Request, registry: RegistryDep) -> JSONResponse:
    """Overall status: ok while Ollama answers, degraded (with the reason) otherwise. No secrets."""
    available = registry.availableModels()
    body = {
        "status": "ok" if registry.ollamaReachable else "degraded",
        "ollama": {"reachable": registry.ollamaReachable, "version": registry.ollamaVersion,
                   "reason": registry.ollamaError},
        "whisper": {"enabled": registry.settings.whisper.enabled, "reachable": registry.whisperReachable},
        "models": {"available": len(available), "configured": len(registry.settings.modelMapping),
                   "names": [spec.externalName for spec in available]},
        "queues": _queues(request),
    }
    return JSONResponse(body)


@router.get("/health/liveliness", response_class=PlainTextResponse, **healthSchemas.livelinessDoc())
@router.get("/health/liveness", response_class=PlainTextResponse, **healthSchemas.livelinessDoc())
async def liveliness() -> PlainTextResponse:
    """The process is alive; checks nothing upstream."""
    return PlainTextResponse("I'm alive!")


@router.get("/health/readiness", **healthSchemas.readinessDoc())
async def readiness(registry: RegistryDep) -> JSONResponse:
    """200 while Ollama is reachable, 503 otherwise."""
    if registry.ollamaReachable:
        return JSONResponse({"status": "healthy", "ollama_version": registry.ollamaVersion})
    return JSONResponse({"status": "unhealthy", "reason": registry.ollamaError}, status_code=503)
