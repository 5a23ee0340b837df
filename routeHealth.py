"""Health probes: /health, /health/liveliness and /health/readiness (LiteLLM/F13 convention).

Without a key they say reachable/unreachable only; with a key of either class /health and /health/readiness add the
details (Ollama's version, why it is unreachable, the available models, the admission queues, each upstream by
name). Internal URLs are never shown.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from core.requestContext import getMeta
from guard.security import presentsValidKey
from observe import healthSchemas
from settings.sections import StateSettings
from state.redisStore import RedisStore
from upstream.dependencies import RegistryDep
from upstream.modelRegistry import ModelRegistry

router = APIRouter(tags=["health"])


def _queues(request: Request) -> list[dict]:
    """Per upstream and model with traffic so far: slots busy / slots / queued (no key names)."""
    admission = getattr(request.app.state, "admission", None)
    return [{"upstream": entry["upstream"], "model": entry["model"], "slotsBusy": entry["slotsBusy"],
             "slots": entry["slots"], "queued": entry["queued"]} for entry in admission.snapshot()] if admission else []


def _withDetails(request: Request) -> bool:
    return presentsValidKey(request.scope, request.app.state.keyRings)


def _healthBody(request: Request, registry: ModelRegistry, details: bool) -> dict:
    ollama: dict = {"reachable": registry.ollamaReachable}
    state = stateHealth(request.app.state.sharedState, registry.settings.state)
    body: dict = {
        "status": "ok" if registry.ollamaReachable and state["reachable"] is not False else "degraded",
        "ollama": ollama,
        "whisper": {"enabled": registry.settings.whisper.enabled, "reachable": registry.whisperReachable},
    }
    if details:
        available = registry.availableModels()
        ollama.update(version=registry.ollamaVersion, reason=registry.ollamaError)
        body["models"] = {"available": len(available), "configured": len(registry.settings.modelMapping),
                          "names": [spec.externalName for spec in available]}
        body["queues"] = _queues(request)
        body["state"] = state
        body["upstreams"] = registry.pool.describe()
    return body


@router.get("/health", **healthSchemas.healthDoc())
async def health(request: Request, registry: RegistryDep) -> JSONResponse:
    """Overall status: ok while Ollama (and Redis, when configured) answer, degraded otherwise; the details need a key
    of either class."""
    return JSONResponse(_healthBody(request, registry, _withDetails(request)))


def stateHealth(store: RedisStore | None, settings: StateSettings) -> dict:
    """Where the shared limits live: this process, or Redis (reachable or not; while not, per-instance limits), the
    instances alive at the last heartbeat and what fail_closed divides the limits by."""
    if store is None:
        return {"backend": "process", "reachable": None, "failure_mode": None, "instances": None,
                "share_divisor": None}
    divisor = store.shareDivisor(settings.instances) if settings.failure_mode == "fail_closed" else 1
    return {"backend": "redis", "reachable": store.reachable, "failure_mode": settings.failure_mode,
            "instances": store.liveInstances, "share_divisor": divisor}


@router.get("/health/liveliness", response_class=PlainTextResponse, **healthSchemas.livelinessDoc())
@router.get("/health/liveness", response_class=PlainTextResponse, **healthSchemas.livelinessDoc())
async def liveliness() -> PlainTextResponse:
    """The process is alive; checks nothing upstream."""
    return PlainTextResponse("I'm alive!")


@router.get("/health/readiness", **healthSchemas.readinessDoc())
async def readiness(request: Request, registry: RegistryDep) -> JSONResponse:
    """200 while Ollama is reachable, 503 otherwise; Ollama's version or the reason need a key of either class."""
    details = _withDetails(request)
    if registry.ollamaReachable:
        return JSONResponse({"status": "healthy", **({"ollama_version": registry.ollamaVersion} if details else {})})
    meta = getMeta(request)
    if meta is not None:
        meta.errorCode = "upstream_unavailable"
    return JSONResponse({"status": "unhealthy", **({"reason": registry.ollamaError} if details else {})},
                        status_code=503)
