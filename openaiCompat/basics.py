"""What every part of the OpenAI translation shares: the one ``invalid`` (400) error, ids, checked numbers and
flags, and the ranges the wire schemas document."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from core.errors import ServiceError

logger = logging.getLogger("poweron.openai")


MAX_TOKENS_RANGE = (1, 1_000_000)


"""``max_tokens`` / ``max_completion_tokens``: far above any model's context, far below what breaks JSON."""


SEED_RANGE = (-(2**63), 2**63 - 1)


"""A signed 64-bit integer, as Ollama takes it (-1 keeps meaning "random" for llama.cpp)."""


TOP_K_RANGE = (1, 1000)


DIMENSIONS_RANGE = (1, 16384)


"""The same limit as ``dimensions`` on /api/embed."""


MAX_EMBEDDING_INPUTS = 2048


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ServiceError:
    """A 400 in OpenAI's invalid_request_error shape."""
    return ServiceError(400, message, code=code, param=param)


def newCompletionId() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def newToolCallId() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def requireModelName(body: dict[str, Any]) -> str:
    """The ``model`` field, present and a non-empty string."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("`model` is required: the name of a model from GET /v1/models", "model")
    return model


def checkedNumber(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(f"`{name}` must be a number from {low:g} to {high:g}", name)
    return value


def checkedInteger(value: Any, name: str, bounds: tuple[int, int]) -> int:
    """An integer within ``bounds`` (inclusive); a whole float such as 5.0 counts."""
    low, high = bounds
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"`{name}` must be an integer from {low:,} to {high:,}", name)
    return value


def stopList(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("`stop` must be a non-empty string or a list of non-empty strings", "stop")
    return stops


def flagOf(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"`{name}` must be true or false", name)
    return value
