"""Version-dependent behaviours of the real daemon that the Ollama stub reproduces (reference ollama-api.md §12).

Each function names the Ollama source it follows. The stub counts one token per whitespace-separated word; an image
costs what the model's vision encoder makes of it (qwen2.5vl: one token per 28x28 pixels after its downscale,
`model/models/qwen25vl/process_image.go`; other vision models: chatPrompt's estimate of 768 per image).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

from PIL import Image

from tests.stubScheduler import versionTuple

INPUT_TOO_LONG = "the input length exceeds the context length"
EMBED_TOO_LONG_OLD = "input exceeds maximum context length"
BAD_SCHEMA = "invalid JSON schema in format"
IMAGE_FAILED = "failed to process inputs: unable to make llava embedding from image"
IMAGE_TOKENS_DEFAULT = 768  # server/prompt.go chatPrompt imageNumTokens
QWEN25VL_PIXELS_OLD = 28 * 28 * 1280  # up to v0.13.3
QWEN25VL_PIXELS_NEW = 2 << 20  # from v0.13.4 (commit 971d62595)
LOOP_PIECES_CAP = 4000
GRAMMAR_PRIMITIVES = ("boolean", "number", "integer", "value", "object", "array", "uuid", "char", "string", "null")


def wordTokens(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def qwenPixelBudget(version: str) -> int:
    return QWEN25VL_PIXELS_NEW if versionTuple(version) >= (0, 13, 4) else QWEN25VL_PIXELS_OLD


def imageSize(text: str) -> tuple[int, int, str] | None:
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
            return image.width, image.height, str(image.format)
    except (binascii.Error, ValueError, OSError):
        return None


def imageTokens(model: Any, text: str, version: str) -> int:
    """qwen2.5vl: pixels after the downscale to the version's budget / (28*28); others 768."""
    if model.family != "qwen25vl":
        return IMAGE_TOKENS_DEFAULT
    size = imageSize(text)
    if size is None:
        return IMAGE_TOKENS_DEFAULT
    pixels = min(size[0] * size[1], qwenPixelBudget(version))
    return max(1, math.ceil(pixels / (28 * 28)))


def webpRefused(model: Any, version: str) -> bool:
    """granite3.2-vision on v0.12 (llama.cpp loader, llama/llama.go ~509) and every model from v0.30 (llama-server)
    until v0.32.14 (commit f427fa075 transcodes WebP) cannot decode WebP."""
    current = versionTuple(version)
    if (0, 30, 0) <= current < (0, 32, 14):
        return True
    return model.family == "granite" and current < (0, 30, 0)


def hasWebp(images: list) -> bool:
    return any(isinstance(text, str) and (imageSize(text) or (0, 0, ""))[2] == "WEBP" for text in images)


def messageTokens(model: Any, message: dict, version: str) -> int:
    images = message.get("images") or []
    return wordTokens(message.get("content")) + sum(imageTokens(model, text, version) for text in images
                                                    if isinstance(text, str))


def fitChat(model: Any, messages: list, numCtx: int, version: str) -> tuple[int, int]:
    """server/prompt.go chatPrompt with truncate on: drop the oldest messages (system messages kept) until the
    prompt fits; the last message is always kept. Returns (prompt tokens after the cut, dropped messages); the
    runner then keeps at most numCtx tokens."""
    costs = [messageTokens(model, message, version) for message in messages]
    last = len(messages) - 1
    for start in range(last + 1):
        systemCost = sum(cost for message, cost in zip(messages[:start], costs) if message.get("role") == "system")
        total = systemCost + sum(costs[start:])
        if total <= numCtx or start == last:
            return min(total, numCtx), start - sum(1 for m in messages[:start] if m.get("role") == "system")
    return 0, 0


def chatTokens(model: Any, messages: list, version: str) -> int:
    return sum(messageTokens(model, message, version) for message in messages)


def truncateRefused(body: dict, version: str) -> bool:
    """`truncate: false` exists from v0.12.6 (commit 6544e1473); older daemons ignore the field."""
    return body.get("truncate") is False and versionTuple(version) >= (0, 12, 6)


def thinkingStyle(model: Any, think: Any, version: str) -> str:
    """"split" (message.thinking), "inline" (<think>...</think> in content: a thinking model without `think`
    before v0.12.4, commit 90d429f5a), "leak" (deepseek-r1 with think false leaks its closing tag, ollama#10964),
    or "none"."""
    if not model.supports("thinking"):
        return "none"
    if think is None:
        return "split" if versionTuple(version) >= (0, 12, 4) else "inline"
    if think is False:
        return "leak" if model.base.startswith("deepseek-r1") else "none"
    return "split"


def schemaError(schema: Any, version: str) -> str | None:
    """Before v0.30 a schema llama.cpp's json-schema-to-grammar cannot convert is a 500 "invalid JSON schema in
    format" (llm/server.go ~1418); the converter's rules (common/json-schema-to-grammar.cpp `visit`)."""
    if versionTuple(version) >= (0, 30, 0) or not isinstance(schema, dict):
        return None
    return BAD_SCHEMA if not _convertible(schema, 0) else None


def _convertible(schema: Any, depth: int) -> bool:
    if not isinstance(schema, dict) or depth > 32:
        return isinstance(schema, dict)
    kind = schema.get("type")
    if "$ref" in schema:
        return str(schema["$ref"]).startswith("#/")
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return all(_convertible(item, depth + 1) for item in schema[key] or [])
    if isinstance(kind, list):
        return all(_convertible({**schema, "type": item}, depth + 1) for item in kind)
    if "const" in schema or "enum" in schema:
        return True
    children = list((schema.get("properties") or {}).values())
    if isinstance(schema.get("items"), dict):
        children.append(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        children.append(schema["additionalProperties"])
    if "pattern" in schema and kind in (None, "string"):
        pattern = str(schema["pattern"])
        if not (pattern.startswith("^") and pattern.endswith("$")):
            return False
    if not all(_convertible(child, depth + 1) for child in children):
        return False
    structural = ("properties", "items", "prefixItems", "allOf", "pattern", "format", "additionalProperties")
    if not schema or kind == "object" or any(key in schema for key in structural):
        return True
    return isinstance(kind, str) and kind in GRAMMAR_PRIMITIVES


def embedTooLongMessage(version: str) -> str:
    """EmbedHandler with truncate false: v0.12-v0.15 "input exceeds maximum context length"; HEAD answers with
    the runner's "the input length exceeds the context length"."""
    return EMBED_TOO_LONG_OLD if versionTuple(version) < (0, 30, 0) else INPUT_TOO_LONG


def loopPieces(numPredict: Any, numCtx: int) -> int:
    """A model stuck in a repetition: without num_predict it runs to 10 x num_ctx tokens (llm/server.go ~1429,
    HEAD llm/llama_server.go ~1544); the stub caps what it sends at LOOP_PIECES_CAP and records the limit."""
    if isinstance(numPredict, int) and numPredict > 0:
        return numPredict
    return 10 * numCtx
