"""JSON request bodies within limits: item count (before parsing), nesting depth, and large bodies parsed on a
worker thread with a parser that lets the event loop run between objects ([limits] max_json_items, max_json_depth).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from core.errors import ServiceError
from core.offload import OffloadPool
from settings.sections import LimitsSettings

INLINE_PARSE_BYTES = 256 * 1024
"""Bodies up to this size are parsed on the event loop with orjson (well under a millisecond); larger ones on a
worker thread with the standard library's parser, whose object hook gives the loop its turn between objects (orjson
holds the interpreter lock for the whole parse: a 37 MB body of small objects blocked the loop for 1.1 s)."""


def tooManyItems(limits: LimitsSettings) -> ServiceError:
    return ServiceError(413, f"The JSON body has more than {limits.max_json_items:,} items ([limits] max_json_items); "
                        "send fewer messages, tools or values per request", code="json_too_large")


def tooDeep(limits: LimitsSettings) -> ServiceError:
    return ServiceError(400, f"The JSON body is nested deeper than {limits.max_json_depth} levels "
                        "([limits] max_json_depth)", code="json_too_deep")


def _objectHook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)  # Python code, so the interpreter lets the event loop's thread run between objects


def _rejectConstant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(raw: bytes) -> Any:
    if len(raw) <= INLINE_PARSE_BYTES:
        return orjson.loads(raw)
    return json.loads(raw, object_pairs_hook=_objectHook, parse_constant=_rejectConstant)


def checkDepth(value: Any, maxDepth: int) -> bool:
    """True when ``value`` nests objects and arrays at most ``maxDepth`` deep (walked without recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= maxDepth:
                    return False
                pending.append((child, depth + 1))
    return True


def parseJsonBytes(raw: bytes, limits: LimitsSettings) -> Any:
    """The parsed body; 413 with too many items, 400 when nested too deep, ValueError when it is not JSON."""
    if raw.count(b",") >= limits.max_json_items:
        raise tooManyItems(limits)
    try:
        value = _parse(raw)
    except RecursionError:
        raise tooDeep(limits) from None
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            raise tooDeep(limits) from None
        raise
    if isinstance(value, (dict, list)) and not checkDepth(value, limits.max_json_depth):
        raise tooDeep(limits)
    return value


async def parseJsonBody(raw: bytes, limits: LimitsSettings, offload: OffloadPool) -> Any:
    """``parseJsonBytes`` on the event loop for small bodies, on a worker thread for large ones."""
    if len(raw) <= INLINE_PARSE_BYTES:
        return parseJsonBytes(raw, limits)
    return await offload.run(parseJsonBytes, raw, limits)
