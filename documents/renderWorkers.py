"""Render workers: documents are rendered in separate processes (PyMuPDF is not thread-safe), so a big PDF never
stalls the event loop, a stuck render is stopped after a time limit, and a crashing renderer never takes the
service down. One ``RenderPool`` lives on ``app.state.renderPool`` for the lifetime of the app."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from core.errors import ServiceError
from documents import documentRender
from documents.documentRender import RenderedDocument, RenderFailure, RenderJob
from upstream.fairQueue import FairLimiter, QueueFull, QueueTimeout

logger = logging.getLogger("poweron.render")
SHUTDOWN_GRACE_SECONDS = 5.0
RETRY_AFTER_BUSY_SECONDS = 5
MAX_QUEUED_RENDERS = 256
"""Renders waiting for a worker before new ones get 503 at once."""
ANONYMOUS_KEY = "anonymous"
MAX_RENDER_ATTEMPTS = 4
"""Renders of one request: the first, one retry after a crash, and redos after pools stopped for other requests."""


WORKER_PRELOAD = ("__main__", "documents.documentRender", "pymupdf", "PIL.Image")
"""Imported once by the fork server, so each worker (also after a restart) starts without importing them again."""


def _newExecutor(workers: int) -> ProcessPoolExecutor:
    """Workers are forked from a fork server (never from the running service, whose threads and sockets must not
    be copied). Processes start on the first render, or at once with ``warmUp``."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=documentRender.initWorker)


class WorkersStopped(Exception):
    """The pool a render ran on was stopped by the service for another request; the render is done again."""


def _killWorkers(executor: ProcessPoolExecutor) -> None:
    """Stop the executor's processes at once (the public API cannot cancel a render that is running)."""
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        if process.is_alive():
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)


class RenderPool:
    """A process pool for ``documentRender.renderInWorker`` with a time limit and recovery from crashed workers."""

    def __init__(self, workers: int, timeoutSeconds: float, weights: dict[str, float] | None = None) -> None:
        self.workers = workers
        self.timeoutSeconds = timeoutSeconds
        self.executor = _newExecutor(workers)
        self.restarts = 0
        self.abandoned = 0
        """Running renders stopped because their request went away."""
        self.stoppedOnPurpose: weakref.WeakSet[ProcessPoolExecutor] = weakref.WeakSet()
        """Pools killed by the service itself (time limit, abandoned render): their other renders are redone."""
        self.warmUpTask: asyncio.Task | None = None
        self.slots = FairLimiter(workers, MAX_QUEUED_RENDERS, timeoutSeconds, weights)
        """One render per worker at a time, so the time limit counts rendering only, never waiting in line; the
        renders waiting are served fairly across key names (weighted by [ratelimit] queue_weights), so one key's
        slow PDFs delay its own later documents, not every other key's."""

    @property
    def queueWaitSeconds(self) -> float:
        """Longest wait for a free worker before the request gets 503 (with Retry-After)."""
        return self.slots.maxWaitSeconds

    @queueWaitSeconds.setter
    def queueWaitSeconds(self, seconds: float) -> None:
        self.slots.maxWaitSeconds = seconds

    async def render(self, job: RenderJob, keyName: str | None = None) -> RenderedDocument:
        """Render in a worker (its DocumentError, a 4xx ServiceError, is raised here). A crashed pool is replaced
        and the render retried once (the crash may have been another request's); a pool stopped on purpose (another
        request's render timed out or was abandoned) does not count as a crash."""
        crashes = 0
        for _ in range(MAX_RENDER_ATTEMPTS):
            try:
                return await self._renderOnce(job, keyName or ANONYMOUS_KEY)
            except WorkersStopped:
                logger.info("render workers were restarted for another request; rendering again")
            except BrokenProcessPool:
                crashes += 1
                if crashes > 1:
                    break
                logger.warning("render worker died; retrying on a fresh pool")
        raise ServiceError(422, "The document crashed the renderer; it is damaged or too complex",
                           code="render_failed")

    async def _renderOnce(self, job: RenderJob, keyName: str) -> RenderedDocument:
        try:
            ticket = self.slots.enqueue(keyName)
            await ticket.wait()
        except (QueueFull, QueueTimeout):
            raise ServiceError(503, f"All render workers stayed busy for {self.queueWaitSeconds:g} s; retry shortly",
                               code="render_busy", headers={"Retry-After": str(RETRY_AFTER_BUSY_SECONDS)}) from None
        try:
            return await self._renderInWorker(job)
        finally:
            ticket.release()

    async def _renderInWorker(self, job: RenderJob) -> RenderedDocument:
        result = await self._runInWorker(job)
        if isinstance(result, RenderFailure):
            raise result.asError()
        return result

    async def _runInWorker(self, job: RenderJob) -> RenderedDocument | RenderFailure:
        executor = self.executor
        try:
            submitted = executor.submit(documentRender.renderInWorker, job)
            return await asyncio.wait_for(asyncio.wrap_future(submitted), self.timeoutSeconds)
        except asyncio.TimeoutError:
            self._replace(executor, "render took longer than the time limit")
            raise ServiceError(422, f"Rendering the document took longer than {self.timeoutSeconds:g} s and was "
                               "stopped; it is too complex (try fewer pages)", code="render_timeout") from None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling() == 0:  # not this request: its pool was shut down under it
                raise WorkersStopped from None
            self._abandon(executor, submitted)
            raise
        except BrokenProcessPool:
            if executor in self.stoppedOnPurpose:
                raise WorkersStopped from None
            self._replace(executor, "render worker died")
            raise
        except Exception:  # the answer could not come back (e.g. not picklable): the document's fault, not a 500
            logger.exception("a render worker's answer was unusable")
            raise ServiceError(422, "The document could not be rendered; it is damaged or too complex",
                               code="render_failed") from None

    def _abandon(self, executor: ProcessPoolExecutor, submitted: Future) -> None:
        """The request went away (its client disconnected): a render still waiting is dropped, a running one is
        stopped by replacing the workers, so no CPU goes on an answer nobody reads and the slot is really free."""
        if submitted.cancel() or submitted.done():
            return
        self.abandoned += 1
        self._replace(executor, "the request of a running render went away")

    def _replace(self, executor: ProcessPoolExecutor, reason: str) -> None:
        """Kill the given executor's workers and start a fresh pool (once, however many requests noticed)."""
        if executor is not self.executor:
            return
        logger.warning("restarting the render workers: %s", reason)
        self.restarts += 1
        self.executor = _newExecutor(self.workers)
        self.stoppedOnPurpose.add(executor)
        _killWorkers(executor)

    async def warmUp(self) -> None:
        """Start every worker now, so the first document does not wait for the processes to start."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(*(loop.run_in_executor(self.executor, documentRender.workerReady)
                                   for _ in range(self.workers)))
        except Exception:  # the first render will start them (and report any problem) instead
            logger.exception("starting the render workers failed")

    def startWarmUp(self) -> None:
        """warmUp in the background (the service answers meanwhile)."""
        self.warmUpTask = asyncio.create_task(self.warmUp(), name="render-workers")

    async def close(self) -> None:
        """Let running renders finish for a few seconds, then stop the workers."""
        executor = self.executor
        try:
            await asyncio.wait_for(asyncio.to_thread(executor.shutdown, True, cancel_futures=True),
                                   SHUTDOWN_GRACE_SECONDS)
        except asyncio.TimeoutError:
            _killWorkers(executor)
