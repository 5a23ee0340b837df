"""PowerOn private LLM service: the app factory, its lifespan and ``python app.py``.

``uvicorn app:app`` works too: ``app`` is built on first access from the configuration. It runs without the connection
guard's limits unless given ``--http app:WorkerProtocol`` (docu/security.md, "Request heads and connections").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI

import routeApi
import routeHealth
import routeOpenAi
import routeWeb
from apidoc import openApi
from config import CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH, ConfigError, Settings, loadSettings
from core.clientDisconnect import installDisconnectHandler
from core.errors import installErrorHandlers, sendInternalError
from core.nativeTelemetry import switchOffNativeTelemetry
from core.offload import OffloadPool
from core.requestContext import RequestContextMiddleware, RequestObserver
from core.turns import TurnGate
from core.workerSupervisor import runWorkers
from documents.renderWorkers import RenderPool
from guard.connectionGuard import protocolFor
from guard.security import fastApiTelemetryOff, installSecurity, reconfigureKeys, requireApiKey, requireOpenAiKey
from observe.accessLog import configureLogging, logAccess
from observe.loopLag import LoopLagMonitor
from observe.metrics import installMetrics
from speech import whisperProxy
from upstream.admission import Admission, policyFromSettings
from state.redisStore import RedisStore
from state.slots import slotPoolFor
from upstream.discovery import UpstreamNode
from upstream.modelRegistry import ModelRegistry
from upstream.httpClient import createHttpClient, fastTransportOf
from upstream.pool import UpstreamPool
from upstream.transport import allowFastUpstreams
from upstream.warmup import ModelWarmup

logger = logging.getLogger("poweron")
GC_THRESHOLDS = (10_000, 10, 10)
"""Cyclic GC thresholds of the serving process (Python's are 700, 10, 10). Requests free almost everything by
reference counting, so a young collection mostly finds the objects of requests in flight and promotes them; at 64
concurrent chats the GC took ~540 ms of CPU in 20 s with Python's thresholds and ~80 ms with these, the longest single
collection ~15 ms of CPU either way (docu/performance.md, "Stalls under load")."""
EVENT_LOOP = "core.eventLoop:newEventLoop"
"""uvloop that accepts every waiting connection at once (core/eventLoop.py): plain uvloop took one per iteration."""
WORKER_HEALTHCHECK_SECONDS = 60
"""uvicorn's supervisor kills a worker that does not answer its ping within this (default 5 s): a worker still
importing the app on a busy host would be killed and restarted forever."""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the one shared upstream client, discover models on every upstream, keep discovery fresh, reload the
    configuration on SIGHUP, watch the loop's lag; close everything on exit."""
    settings: Settings = app.state.settings
    sharedState: RedisStore | None = app.state.sharedState
    if sharedState is not None:
        await sharedState.start()
    http = createHttpClient(settings.ollama.connect_timeout, settings.ollama.read_timeout,
                            settings.ollama.max_connections,
                            list(settings.upstreams.values()) if settings.ollama.fast_transport else None)
    app.state.http = http
    app.state.offload = OffloadPool(settings.limits.worker_threads)
    app.state.pool = pool = UpstreamPool(settings, http, admission=app.state.admission)
    app.state.admission.accepting = pool.accepts  # a request that waited is never sent where none may go now
    app.state.registry = registry = ModelRegistry(settings, pool, http)
    app.state.warmup = warmup = ModelWarmup(settings)
    registry.listeners.append(warmup.onRefresh)
    app.state.renderPool = renderPool = RenderPool(settings.documents.render_workers,
                                                   settings.documents.render_timeout_seconds, settings.queueWeights)
    if settings.documents.prestart_workers:
        renderPool.startWarmUp()
    await registry.refresh()
    refresher = asyncio.create_task(registry.run(), name="model-discovery")
    reloads = installReloadSignal(app)
    if getattr(app.state, "freezeAfterStartup", False):
        freezeStartupObjects()  # the clients, pools and registry made above are long-lived too
    metrics = getattr(app.state, "metrics", None)
    app.state.loopLag = lagMonitor = LoopLagMonitor(metrics.loopLag if metrics else None,
                                                    metrics.gcPauses if metrics else None).start()
    try:
        yield
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in (refresher, *reloads):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await warmup.close()
        await renderPool.close()
        await http.aclose()
        await lagMonitor.stop()
        app.state.offload.close()
        if sharedState is not None:
            await sharedState.close()


def installReloadSignal(app: FastAPI) -> set[asyncio.Task[bool]]:
    """SIGHUP reloads config.ini in the background (one reload at a time); returns the set of running reloads."""
    running: set[asyncio.Task[bool]] = set()
    lock = asyncio.Lock()

    async def serialised() -> bool:
        async with lock:
            return await reloadConfig(app)

    def onSignal() -> None:
        task = asyncio.get_running_loop().create_task(serialised(), name="config-reload")
        running.add(task)
        task.add_done_callback(running.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on the main thread (tests) or platform
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, onSignal)
    return running


async def reloadConfig(app: FastAPI) -> bool:
    """Read config.ini again and apply upstreams, drain marks, keys, per-key limits, admission (slots, queue
    lengths, longest wait, queue weights), the model mapping and the Redis heartbeat period without dropping a
    connection; a bad file is refused (one log line why) and the running configuration stays."""
    path = os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH)
    try:
        settings = loadSettings()
    except ConfigError as exc:
        logger.error("config reload refused, keeping the running configuration: %s", exc)
        return False
    pool: UpstreamPool = app.state.pool
    nodes = await pool.prepare(settings)  # new upstreams are probed before any request can go to them
    if settings.ollama.fast_transport:
        allowFastUpstreams(fastTransportOf(app.state.http), list(settings.upstreams.values()))
    applySettings(app, settings, nodes)
    logger.info("config reloaded from %s: upstreams %s%s", path, ", ".join(settings.upstreams),
                f" (draining: {', '.join(sorted(settings.drainingUpstreams))})" if settings.drainingUpstreams else "")
    return True


def applySettings(app: FastAPI, settings: Settings, nodes: dict[str, UpstreamNode]) -> None:
    """Switch every reloadable part at once (no await in between, so no request sees half of it)."""
    known = set(app.state.pool.nodes.values())
    app.state.settings = settings
    reconfigureKeys(app, settings)
    app.state.pool.apply(settings, nodes)  # what waits at an upstream that closed now goes elsewhere
    app.state.admission.reconfigure(policyFromSettings(settings))  # slots, queues, wait, weights: next decisions
    app.state.renderPool.slots.weights = dict(settings.queueWeights)
    app.state.registry.settings = settings
    app.state.warmup.settings = settings
    if app.state.sharedState is not None:
        app.state.sharedState.reconfigure(settings.state.heartbeat_seconds)  # the next beat: new period and TTL
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.reconfigure(settings)
    for node in nodes.values():
        if node not in known and node.reachable and settings.warmupModels:
            app.state.warmup.start(app.state.registry, node)


def createApp(settings: Settings) -> FastAPI:
    """Build the service for the given settings."""
    switchOffNativeTelemetry()  # before the render workers (pymupdf imports onnxruntime) start
    app = FastAPI(title="PowerOn private LLM service", version="1.0.0", lifespan=lifespan, redirect_slashes=False,
                  docs_url=None, redoc_url=None, openapi_url=None, **fastApiTelemetryOff())
    app.state.settings = settings
    app.state.admission = Admission(policyFromSettings(settings))
    openApi.installOpenApi(app)
    observers: list[RequestObserver] = []
    app.state.requestObservers = observers
    installErrorHandlers(app)
    installDisconnectHandler(app)
    if settings.metrics.enabled:
        installMetrics(app, observers)
    app.include_router(routeOpenAi.router, dependencies=[Depends(requireOpenAiKey)])  # the busiest routes first:
    app.include_router(routeApi.router, dependencies=[Depends(requireApiKey)])  # FastAPI tries routes in order
    app.include_router(whisperProxy.router, dependencies=[Depends(requireOpenAiKey)])
    app.include_router(routeHealth.router)
    routeWeb.installWeb(app)
    observers.append(logAccess)
    installSecurity(app, settings)
    app.state.slots = slotPoolFor(app.state.sharedState, settings.state.failure_mode == "fail_closed",
                                  settings.state.instances)
    app.state.admission.useSlots(app.state.slots)
    app.state.turns = TurnGate()
    app.add_middleware(RequestContextMiddleware, observers=observers, renderError=sendInternalError,
                       turns=app.state.turns)
    return app


def __getattr__(name: str) -> Any:
    """``app`` for ``uvicorn app:app``, built from config.ini and the environment on first access; ``WorkerProtocol``,
    the guarded HTTP protocol each worker imports by name (``[server] workers`` > 1: a class made at run time cannot
    be pickled into a spawned worker)."""
    if name == "app":
        return createApp(loadSettings())
    if name == "WorkerProtocol":
        return protocolFor(loadSettings().server)
    raise AttributeError(name)


def freezeStartupObjects() -> None:
    """Keep what exists at start (modules, routes, settings) out of the cyclic GC's full collections, which then
    scan only what requests allocate (measured at 64 concurrent chats: gen2 pauses of ~100 ms down to ~10 ms), and
    collect the youngest generation less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def servedApp(settings: Settings) -> FastAPI:
    """The app as a server process runs it: OpenAPI built before serving, start-up objects frozen."""
    service = createApp(settings)
    service.state.freezeAfterStartup = True
    service.openapi()  # built now, not on the event loop at the first request refused before routing (~0.25 s)
    freezeStartupObjects()
    return service


def workerApp() -> FastAPI:
    """Factory each uvicorn worker process calls when ``[server] workers`` > 1 (settings are read in the worker)."""
    settings = loadSettings()
    configureLogging(settings.server.log_level)
    return servedApp(settings)


def main() -> None:
    try:
        settings = loadSettings()
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc}")
    configureLogging(settings.server.log_level)
    server = settings.server
    common = dict(host=server.host, port=server.port, loop=EVENT_LOOP, http=protocolFor(server),
                  timeout_keep_alive=server.keep_alive_seconds, access_log=False,
                  server_header=False, log_level=server.log_level,
                  timeout_graceful_shutdown=server.graceful_shutdown_seconds)
    if server.workers > 1:  # N processes on one port; the per-key limits live in Redis ([state] redis_url)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        common["http"] = "app:WorkerProtocol"
        runWorkers("app:workerApp", factory=True, workers=server.workers, **common,  # SIGHUP: reload each in place
                   timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS)
        return
    uvicorn.run(servedApp(settings), **common)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
