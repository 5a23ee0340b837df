"""Wire schemas of the health routes (/health, /health/liveliness, /health/readiness)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from core.wire import (
    ApiError,
    WireModel,
    jsonOf,
    operationDoc,
    textPlain,
)

# ------------------------------------------------------------------------------------------------ health


class OllamaHealth(WireModel):
    reachable: bool
    version: str | None = Field(None, description="Ollama's version (only with a key of either class)")
    reason: str | None = Field(None, description="Why Ollama counts as unreachable (null while it answers; only with "
                                                 "a key of either class)")


class WhisperHealth(WireModel):
    enabled: bool
    reachable: bool


class ModelCounts(WireModel):
    available: int
    configured: int
    names: list[str] = Field(description="External names of the models available now")


class ModelQueue(WireModel):
    """Admission control of one Ollama model: requests in flight, the slots, requests waiting in the service."""

    upstream: str = Field(description="Upstream name (`default` for [ollama] base_url)")
    model: str = Field(description="Ollama model name")
    slotsBusy: int
    slots: int
    queued: int


class StateHealth(WireModel):
    backend: Literal["process", "redis"] = Field(description="Where the per-key limits live")
    reachable: bool | None = Field(description="Redis answers (null without Redis); false: per-instance limits")
    failure_mode: Literal["fail_open", "fail_closed"] | None = Field(
        description="What the limits are while Redis is unreachable (null without Redis)")
    instances: int | None = Field(
        None, description="Instances of the service alive at the last successful heartbeat in Redis, this one "
                          "included (null without Redis or before the first heartbeat answered)")
    share_divisor: int | None = Field(
        None, description="While Redis is unreachable each instance applies a key's limits divided by this: with "
                          "fail_closed the instances above, or [state] instances when no count was ever seen; 1 with "
                          "fail_open (null without Redis)")


class LoadedModelHealth(WireModel):
    name: str
    contextLength: int | None
    sizeVram: int | None
    expiresAt: str | None


class UpstreamHealth(WireModel):
    """One Ollama upstream by name (its URL is never shown)."""

    name: str
    reachable: bool
    draining: bool = Field(description="Takes no new requests; running ones finish ([ollama] drain)")
    version: str | None
    reason: str | None = Field(description="Why it counts as unreachable (null while it answers)")
    modelsPulled: list[str]
    modelsLoaded: list[LoadedModelHealth] = Field(description="From the upstream's /api/ps")
    inFlight: int = Field(description="Requests this service has running there")
    slotsBusy: dict[str, int] = Field(description="Busy slots per Ollama model ([ollama] num_parallel per model)")
    queued: int = Field(description="Requests sent beyond the free slots (waiting inside Ollama)")


class Health(WireModel):
    """Overall status; without a key only whether Ollama and whisper are reachable, with a key of either class the
    details too. Never internal URLs or secrets."""

    status: Literal["ok", "degraded"]
    ollama: OllamaHealth
    whisper: WhisperHealth
    models: ModelCounts | None = Field(None, description="Only with a key of either class")
    queues: list[ModelQueue] | None = Field(None, description="Per model that had requests since the start: slots "
                                            "busy / slots / queued (only with a key of either class)")
    state: StateHealth | None = Field(None, description="Where the per-key limits live (only with a key of either "
                                      "class)")


    upstreams: list[UpstreamHealth] | None = Field(None, description="Each Ollama upstream by name (never its URL); "
                                                   "only with a key of either class")


class Ready(WireModel):
    status: Literal["healthy"]
    ollama_version: str | None = Field(None, description="Only with a key of either class")


class NotReady(WireModel):
    status: Literal["unhealthy"]
    reason: str | None = Field(None, description="Only with a key of either class")


def healthDoc() -> dict[str, Any]:
    return operationDoc(jsonOf(Health), (), ApiError, okDescription="Status of the service and its upstreams")

def livelinessDoc() -> dict[str, Any]:
    return operationDoc(textPlain(), (), ApiError, okDescription="The process is alive")

def readinessDoc() -> dict[str, Any]:
    doc = operationDoc(jsonOf(Ready), (), ApiError, okDescription="Ollama is reachable")
    doc["responses"][503] = {"description": "Ollama is not reachable", "content": jsonOf(NotReady)}
    return doc
