"""The access log: one JSON line per completed request on the logger ``poweron.access``, metadata only.

Fields: request id, method, route template and path, key name and class, external model, upstream name (and the
one that failed before a retry), status, durations and
token counts. Never prompt text, file content, embeddings, answers or keys; the query string is left out too.
"""

from __future__ import annotations

import io
import logging
import select
import time
from typing import TextIO

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


class NonBlockingStreamHandler(logging.StreamHandler):
    """Writes a line only when the stream can take it at once, else drops it and counts it; the next line written
    says how many were dropped. A plain StreamHandler writes on the event loop and blocked it: with a stderr pipe
    nobody read (a stalled journald or log shipper), request 161 hung and /health/liveliness with it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.dropped = 0
        self.poller: select.poll | None = None
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):  # not a file descriptor (tests): plain writes
            return
        self.poller = select.poll()
        self.poller.register(fd, select.POLLOUT)

    def emit(self, record: logging.LogRecord) -> None:
        if self.poller is not None and not self.poller.poll(0):
            self.dropped += 1
            return
        if self.dropped:
            count, self.dropped = self.dropped, 0
            super().emit(logging.makeLogRecord({"msg": f"{count} log lines dropped: the log's reader was not reading",
                                                "levelno": logging.WARNING, "levelname": "WARNING"}))
        super().emit(record)


def configureLogging(level: str, stream: TextIO | None = None) -> None:
    """Plain message format for the process (the access line is JSON already), written without ever blocking the
    event loop (NonBlockingStreamHandler); noisy libraries held at WARNING. A root logger that has handlers already
    (a test run) keeps them."""
    logging.basicConfig(format="%(message)s", handlers=[NonBlockingStreamHandler(stream)])
    logging.getLogger().setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
