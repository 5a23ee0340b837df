"""The access log: one JSON line per completed request on the logger ``poweron.access``, metadata only.

Fields: request id, method, route template and path, key name and class, external model, upstream name (and the
one that failed before a retry), status, durations and
token counts. Never prompt text, file content, embeddings, answers or keys; the query string is left out too.
"""

from __future__ import annotations

import logging
import time

import orjson

from core.requestContext import RequestMeta

ACCESS_LOGGER = "poweron.access"
QUIET_LOGGERS = ("httpx", "httpcore", "multipart", "python_multipart", "PIL", "uvicorn.access")
"""Libraries that log per request (URLs, multipart parsing steps) are held at WARNING; our access line suffices."""
MAX_PATH_CHARS = 200
logger = logging.getLogger(ACCESS_LOGGER)


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def accessRecord(meta: RequestMeta) -> dict:
    """The fields of one access line."""
    return {
        "ts": round(time.time(), 3), "requestId": meta.requestId, "method": meta.method, "route": meta.route,
        "path": meta.path[:MAX_PATH_CHARS], "key": meta.keyName, "keyClass": meta.keyClass,
        "model": meta.externalModel, "upstream": meta.upstream, "failedOver": meta.failedOver,
        "status": meta.status, "durationMs": _milliseconds(meta.durationSeconds),
        "upstreamMs": _milliseconds(meta.upstreamSeconds), "ttftMs": _milliseconds(meta.ttftSeconds),
        "queueMs": _milliseconds(meta.queueSeconds),
        "promptTokens": meta.promptTokens, "completionTokens": meta.completionTokens, "streamed": meta.streamed,
        "rateLimited": meta.rateLimited, "error": meta.errorCode,
    }


def logAccess(meta: RequestMeta) -> None:
    """Request observer: writes the access line of a completed request."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(orjson.dumps(accessRecord(meta)).decode())


def configureLogging(level: str) -> None:
    """Plain message format for the process (the access line is JSON already); noisy libraries held at WARNING."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
