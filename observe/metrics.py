"""Prometheus metrics of one app: counters and histograms fed from RequestMeta, in-flight requests, model
availability read at scrape time, and the key-protected ``GET /metrics`` route.

Labels hold metadata from fixed sets only (route templates, configured model and key names, status codes, error
codes of the service); never paths, prompts, file names or keys. Each app has its own CollectorRegistry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings
from core.errors import ServiceError
from core.requestContext import RequestMeta, RequestObserver, getMeta
from guard.security import KEY_CLASS_API, KEY_CLASS_OPENAI, authenticate
from observe.labelCache import LabelCache
from observe.loopLag import GC_PAUSE_BUCKETS, LAG_BUCKETS, SAMPLE_INTERVAL_SECONDS
from observe.queueMetrics import installQueueMetrics

METRICS_PATH = "/metrics"
NO_LABEL = "none"
UNMATCHED_ROUTE = "unmatched"
OTHER_LABEL = "other"
ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")
"""Shape of the service's error codes (``model_not_found``); anything else is counted as ``other``."""
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

router = APIRouter(tags=["metrics"], include_in_schema=False)


def methodLabel(method: str) -> str:
    """The HTTP method, or ``other`` for anything outside the usual set."""
    return method if method in KNOWN_METHODS else OTHER_LABEL


class AvailabilityCollector:
    """Model availability and upstream reachability, read from the model registry at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        registry = getattr(self.app.state, "registry", None)
        if registry is not None:
            available, reachable, up, draining, inFlight, loaded = families
            for spec in registry.settings.modelMapping.values():
                available.add_metric([spec.externalName, spec.type, spec.backend],
                                     1.0 if registry.isAvailable(spec) else 0.0)
            reachable.add_metric(["ollama"], 1.0 if registry.ollamaReachable else 0.0)
            reachable.add_metric(["whisper"], 1.0 if registry.whisperReachable else 0.0)
            for node in registry.pool.active():
                up.add_metric([node.name], 1.0 if node.reachable else 0.0)
                draining.add_metric([node.name], 1.0 if node.draining else 0.0)
                inFlight.add_metric([node.name], float(node.inFlight))
                loaded.add_metric([node.name], float(len(node.loaded)))
        yield from families

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (GaugeMetricFamily("poweron_model_available", "1 while the model can serve requests (pulled in Ollama "
                                  "or whisper reachable), else 0", labels=["model", "type", "backend"]),
                GaugeMetricFamily("poweron_upstream_reachable", "1 while the upstream answers its probe, else 0",
                                  labels=["upstream"]),
                GaugeMetricFamily("poweron_ollama_upstream_up", "1 while this Ollama upstream answers, else 0",
                                  labels=["upstream"]),
                GaugeMetricFamily("poweron_ollama_upstream_draining", "1 while this Ollama upstream is drained "
                                  "(takes no new requests)", labels=["upstream"]),
                GaugeMetricFamily("poweron_ollama_upstream_in_flight", "Requests this service has running at this "
                                  "Ollama upstream", labels=["upstream"]),
                GaugeMetricFamily("poweron_ollama_upstream_models_loaded", "Models loaded at this Ollama upstream "
                                  "(last /api/ps)", labels=["upstream"]))


class StateCollector:
    """Shared state in Redis (``[state] redis_url``), read at scrape time: whether Redis answers and the instances
    alive at the last successful heartbeat (no sample without Redis or before a count was seen)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = reachable, instances = self._families()
        store = getattr(self.app.state, "sharedState", None)
        if store is not None:
            reachable.add_metric([], 1.0 if store.reachable else 0.0)
            if store.liveInstances is not None:
                instances.add_metric([], float(store.liveInstances))
        yield from families

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (GaugeMetricFamily("poweron_state_redis_reachable", "1 while the Redis of [state] redis_url answers, "
                                  "else 0 (per-instance limits)"),
                GaugeMetricFamily("poweron_state_instances", "Instances of the service alive at the last successful "
                                  "heartbeat in Redis, this one included (kept while Redis is unreachable: fail_closed "
                                  "divides the limits by it)"))


class InFlightMiddleware:
    """Pure ASGI wrapper counting the HTTP requests being served (open streams included)."""

    def __init__(self, app: ASGIApp, gauge: Gauge) -> None:
        self.app = app
        self.gauge = gauge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.gauge.track_inprogress():
            await self.app(scope, receive, send)


class ServiceMetrics:
    """The collectors of one app and the request observer that feeds them."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.reconfigure(settings)
        self.children = LabelCache()
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("poweron_requests", "Completed requests by route template, method, model and status",
                                ["route", "method", "model", "status"], registry=registry)
        self.duration = Histogram("poweron_request_duration_seconds", "Time from request to the end of the response "
                                  "(end of the stream for streams)", ["route", "model"], buckets=LATENCY_BUCKETS,
                                  registry=registry)
        self.ttft = Histogram("poweron_time_to_first_token_seconds", "Time from request to the first generated token "
                              "of a stream", ["model"], buckets=TTFT_BUCKETS, registry=registry)
        self.upstream = Histogram("poweron_upstream_duration_seconds", "Time spent waiting for Ollama or whisper",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.promptTokens = Counter("poweron_prompt_tokens", "Prompt tokens reported by the upstream",
                                    ["model", "key"], registry=registry)
        self.completionTokens = Counter("poweron_completion_tokens", "Completion tokens reported by the upstream",
                                        ["model", "key"], registry=registry)
        self.rateLimited = Counter("poweron_rate_limited", "Requests refused by the per-key rate or concurrency limit",
                                   ["route", "key"], registry=registry)
        self.errors = Counter("poweron_request_errors", "Requests that ended in an error, by the service's error code",
                              ["route", "code"], registry=registry)
        self.upstreamRequests = Counter("poweron_upstream_requests", "Completed requests by the Ollama upstream that "
                                        "served them, model and status", ["upstream", "model", "status"],
                                        registry=registry)
        self.failovers = Counter("poweron_upstream_failovers", "Requests retried on another upstream, by the upstream "
                                 "that failed first", ["upstream"], registry=registry)
        self.inFlight = Gauge("poweron_requests_in_flight", "Requests being served now (open streams included)",
                              registry=registry)
        self.loopLag = Histogram("event_loop_lag_seconds", f"How much later than asked a task sleeping "
                                 f"{SAMPLE_INTERVAL_SECONDS * 1000:g} ms at a time woke up: time the event loop spent "
                                 "without yielding", buckets=LAG_BUCKETS, registry=registry)
        self.gcPauses = Histogram("python_gc_pause_seconds", "Duration of each collection of the cyclic garbage "
                                  "collector, by generation", ["generation"], buckets=GC_PAUSE_BUCKETS,
                                  registry=registry)
        registry.register(AvailabilityCollector(app))
        registry.register(StateCollector(app))

    def reconfigure(self, settings: Settings) -> None:
        """Label sets of a (re)loaded configuration: model, key and upstream names."""
        self.modelNames = frozenset(settings.modelMapping)
        self.keyNames = frozenset(settings.apiKeys) | frozenset(settings.openAiKeys)
        self.upstreamNames = self.__dict__.get("upstreamNames", frozenset()) | frozenset(settings.upstreams)

    def _modelLabel(self, externalName: str | None) -> str:
        return externalName if externalName in self.modelNames else NO_LABEL

    def _keyLabel(self, keyName: str | None) -> str:
        return keyName if keyName in self.keyNames else NO_LABEL

    def observe(self, meta: RequestMeta) -> None:
        """Request observer: record one completed request (called by RequestContextMiddleware)."""
        route, child = meta.route or UNMATCHED_ROUTE, self.children
        model = self._modelLabel(meta.externalModel)
        key = self._keyLabel(meta.keyName)
        child(self.requests, route, methodLabel(meta.method), model, str(meta.status or NO_LABEL)).inc()
        if meta.durationSeconds is not None:
            child(self.duration, route, model).observe(meta.durationSeconds)
        if meta.ttftSeconds is not None:
            child(self.ttft, model).observe(meta.ttftSeconds)
        if meta.upstreamSeconds is not None:
            child(self.upstream, model).observe(meta.upstreamSeconds)
        if meta.promptTokens:
            child(self.promptTokens, model, key).inc(meta.promptTokens)
        if meta.completionTokens:
            child(self.completionTokens, model, key).inc(meta.completionTokens)
        if meta.rateLimited:
            child(self.rateLimited, route, key).inc()
        if meta.upstream in self.upstreamNames:
            child(self.upstreamRequests, meta.upstream, model, str(meta.status or NO_LABEL)).inc()
        if meta.failedOver in self.upstreamNames:
            child(self.failovers, meta.failedOver).inc()
        if meta.errorCode:
            child(self.errors, route, meta.errorCode if ERROR_CODE.fullmatch(meta.errorCode) else OTHER_LABEL).inc()


async def requireAnyKey(request: Request) -> str:
    """Dependency for /metrics: an analysis key in X-API-Key or an OpenAI key as Bearer. Scrapes are not counted
    against the key's rate limits, so monitoring still works while a client exhausts them."""
    if request.headers.get("x-api-key"):
        keyClass = KEY_CLASS_API
    elif request.headers.get("authorization"):
        keyClass = KEY_CLASS_OPENAI
    else:
        raise ServiceError(401, "Missing API key: /metrics needs an analysis key in the X-API-Key header or an "
                           "OpenAI key as 'Authorization: Bearer <key>'", code="missing_api_key")
    name = authenticate(request.scope, request.app.state.keyRings, keyClass)
    meta = getMeta(request)
    if meta is not None:
        meta.keyName, meta.keyClass = name, keyClass
    return name


@router.get(METRICS_PATH, dependencies=[Depends(requireAnyKey)])
async def metricsEndpoint(request: Request) -> Response:
    """Prometheus metrics of this process (needs an analysis or OpenAI key)."""
    encoder, contentType = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics.registry), media_type=contentType)


def installMetrics(app: FastAPI, observers: list[RequestObserver]) -> ServiceMetrics:
    """Create the app's metrics, feed them from the request observers, count in-flight requests, add /metrics."""
    metrics = ServiceMetrics(app, app.state.settings)
    installQueueMetrics(app, metrics.registry, app.state.settings)
    app.state.metrics = metrics
    observers.append(metrics.observe)
    app.add_middleware(InFlightMiddleware, gauge=metrics.inFlight)
    app.include_router(router)
    return metrics
