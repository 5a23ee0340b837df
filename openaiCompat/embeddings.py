"""OpenAI /v1/embeddings: inputs and options checked, Ollama's vectors shaped as OpenAI's embedding list."""

from __future__ import annotations

import base64
import math
import sys
from array import array
from typing import Any

from openaiCompat.basics import DIMENSIONS_RANGE, MAX_EMBEDDING_INPUTS, checkedInteger, invalid


def embeddingInputs(value: Any) -> list[str]:
    """``input`` as a list of non-empty strings (token arrays are not supported)."""
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs:
        raise invalid("`input` must be a non-empty string or a non-empty list of strings", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"`input` may hold at most {MAX_EMBEDDING_INPUTS} strings per request", "input")
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise invalid(f"`input[{index}]` must be a string (token arrays are not supported; send text)",
                          f"input[{index}]")
        if not text:
            raise invalid(f"`input[{index}]` is empty", f"input[{index}]")
    return inputs


def embeddingOptions(body: dict[str, Any]) -> tuple[bool, int | None]:
    """(base64 wanted, dimensions) from ``encoding_format`` and ``dimensions``."""
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise invalid("`encoding_format` must be float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = checkedInteger(dimensions, "dimensions", DIMENSIONS_RANGE)
    return encoding == "base64", dimensions


def _shortened(vector: list[float], dimensions: int | None) -> list[float]:
    """Truncate to ``dimensions`` and re-normalise (Matryoshka), when Ollama returned more."""
    if not dimensions or len(vector) <= dimensions:
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(value * value for value in head)) or 1.0
    return [value / norm for value in head]


def _base64Floats(vector: list[float]) -> str:
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddingResponse(answer: dict[str, Any], externalName: str, asBase64: bool,
                      dimensions: int | None) -> dict[str, Any]:
    """OpenAI's embeddings list from Ollama's ``/api/embed`` answer."""
    data = []
    for index, vector in enumerate(answer.get("embeddings") or ()):
        vector = _shortened(vector, dimensions)
        data.append({"object": "embedding", "index": index,
                     "embedding": _base64Floats(vector) if asBase64 else vector})
    tokens = int(answer.get("prompt_eval_count") or 0)
    return {"object": "list", "data": data, "model": externalName,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
