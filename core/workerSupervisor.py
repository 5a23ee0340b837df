"""``[server] workers`` > 1: uvicorn's multiprocess supervisor, except that SIGHUP is passed on to every worker.

uvicorn's supervisor answers SIGHUP by replacing all workers (a request or stream in flight at a worker and its
in-process state go with it). Here each worker gets the SIGHUP instead and reloads config.ini in place with its own
handler (``app.reloadConfig``), exactly as the single process does; a bad file is refused by each worker. A worker
still starting has no reload handler yet (a SIGHUP would end it) but may have read config.ini before it changed: the
supervisor remembers the SIGHUP for it and passes it on from its loop once that worker has started (a worker
replaced meanwhile is forgotten: its successor reads config.ini as it starts). Only ``handle_hup`` and
``handle_signals`` (the loop's step, every 0.5 s) are overridden; a uvicorn without ``handle_hup`` gets uvicorn's own
supervisor and one warning in the log.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
from typing import Any

import uvicorn

logger = logging.getLogger("poweron")
READY_TIMEOUT_SECONDS = 5.0
"""How long the supervisor waits for a worker to say whether it has started (its reload handler is installed only
once it has; the SIGHUP then waits until it has)."""
PENDING_CHECK_SECONDS = 1.0
"""How long the supervisor's loop waits for a worker with a pending SIGHUP to say whether it has started."""

try:
    from uvicorn.supervisors.multiprocess import Multiprocess
except ImportError:  # pragma: no cover - a uvicorn without the multiprocess supervisor
    Multiprocess = None  # type: ignore[assignment,misc]


def _isStarted(process: Any, timeout: float = READY_TIMEOUT_SECONDS) -> bool:
    """Whether a worker finished starting (uvicorn's ``is_ready``; a uvicorn without it: the process is alive)."""
    isReady = getattr(process, "is_ready", None)
    if callable(isReady):
        return bool(isReady(timeout=timeout))
    inner = getattr(process, "process", None)
    return bool(inner is not None and inner.is_alive())


def forwardHangup(processes: list[Any]) -> tuple[list[int], list[int]]:
    """Send SIGHUP to every started worker; returns the PIDs signalled and those skipped (still starting or gone)."""
    sent: list[int] = []
    skipped: list[int] = []
    for process in processes:
        pid = getattr(process, "pid", None)
        if pid is None:
            continue
        if not _isStarted(process):
            skipped.append(pid)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
            sent.append(pid)
    return sent, skipped


def deliverPending(processes: list[Any], pending: frozenset[int]) -> tuple[list[int], frozenset[int]]:
    """Send the remembered SIGHUP to each pending worker that has started now; returns the PIDs signalled and those
    still pending (a PID no longer among the workers is dropped: replaced, its successor read config.ini)."""
    sent: list[int] = []
    stillPending: set[int] = set()
    for process in processes:
        pid = getattr(process, "pid", None)
        if pid not in pending:
            continue
        if not _isStarted(process, PENDING_CHECK_SECONDS):
            stillPending.add(pid)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
            sent.append(pid)
    return sent, frozenset(stillPending)


if Multiprocess is not None:
    class HangupForwardingSupervisor(Multiprocess):  # type: ignore[misc,valid-type]
        """uvicorn's supervisor; SIGHUP reloads each worker in place rather than replacing the workers, and reaches a
        worker that was still starting once it has started."""

        pendingHangups: frozenset[int] = frozenset()
        """Workers that were still starting at a SIGHUP: they get it once started (``handle_signals``)."""

        def handle_hup(self) -> None:
            sent, skipped = forwardHangup(list(self.processes))
            logger.info("SIGHUP passed on to workers %s: each reloads config.ini in place",
                        ", ".join(map(str, sent)) or "(none)")
            if skipped:
                self.pendingHangups = self.pendingHangups | set(skipped)
                logger.info("SIGHUP for workers %s held back: still starting; passed on once each has started",
                            ", ".join(map(str, skipped)))

        def handle_signals(self) -> None:
            super().handle_signals()
            if self.pendingHangups:
                sent, self.pendingHangups = deliverPending(list(self.processes), self.pendingHangups)
                for pid in sent:
                    logger.info("SIGHUP passed on to worker %d now that it has started: it reloads config.ini in "
                                "place", pid)


def supervisorClass() -> type | None:
    """The forwarding supervisor, or None (with one warning) when this uvicorn's supervisor has no ``handle_hup``."""
    if Multiprocess is None or not callable(getattr(Multiprocess, "handle_hup", None)):
        logger.warning("uvicorn %s has no multiprocess SIGHUP handler to override: SIGHUP restarts the workers "
                       "instead of reloading them in place", uvicorn.__version__)
        return None
    return HangupForwardingSupervisor


def runWorkers(target: str, **options: Any) -> None:
    """``uvicorn.run(target, **options)`` (``workers`` > 1) under the forwarding supervisor."""
    supervisor = supervisorClass()
    if supervisor is None:
        uvicorn.run(target, **options)
        return
    config = uvicorn.Config(target, **options)
    extra: dict[str, Any] = {}
    if "target" in inspect.signature(supervisor.__init__).parameters:  # uvicorn before the target-less supervisor
        extra["target"] = uvicorn.Server(config=config).run
    sockets = [config.bind_socket()]
    with contextlib.suppress(KeyboardInterrupt):
        supervisor(config, sockets=sockets, **extra).run()
