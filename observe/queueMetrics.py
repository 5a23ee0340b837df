"""Prometheus metrics of admission control (upstream/admission.py): slots busy, slots and queue length per upstream
and model (and waiting requests per key name) read at scrape time; wait-time histograms and refusals per model and
key name fed by the admission's listeners; the render workers' queue.

Labels from fixed sets only: upstream names and Ollama model names from the configuration, configured key names
(anything else is ``none``), the refusal codes ``queue_full`` and ``queue_timeout``.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from config import Settings
from observe.labelCache import LabelCache
from upstream.admission import Admission

NO_LABEL = "none"
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class QueueCollector:
    """Gauges read from the admission queues and the render pool when Prometheus scrapes."""

    def __init__(self, app: FastAPI, labels: QueueLabels) -> None:
        self.app = app
        self.labels = labels

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        busy, slots, queued, byKey, renderQueued = families = self._families()
        admission: Admission | None = getattr(self.app.state, "admission", None)
        for entry in admission.snapshot() if admission is not None else []:
            labels = [entry["upstream"], self.labels.model(entry["model"])]
            busy.add_metric(labels, entry["slotsBusy"])
            slots.add_metric(labels, entry["slots"])
            queued.add_metric(labels, entry["queued"])
            for keyName, count in entry["queuedByKey"].items():
                byKey.add_metric([*labels, self.labels.key(keyName)], count)
        pool = getattr(self.app.state, "renderPool", None)
        if pool is not None:
            renderQueued.add_metric([], len(pool.slots.waiting))
        yield from families

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("poweron_model_slots_busy", "Requests in flight to Ollama for the model (admission "
                              "control)", labels=["upstream", "model"]),
            GaugeMetricFamily("poweron_model_slots", "Slots the service uses for the model ([ollama] num_parallel)",
                              labels=["upstream", "model"]),
            GaugeMetricFamily("poweron_model_queue_length", "Requests waiting in the service for a slot of the model",
                              labels=["upstream", "model"]),
            GaugeMetricFamily("poweron_model_queue_length_by_key", "Requests waiting for a slot of the model, by key "
                              "name", labels=["upstream", "model", "key"]),
            GaugeMetricFamily("poweron_render_queue_length", "Documents waiting for a render worker"),
        )


class QueueLabels:
    """Label values from fixed sets: configured Ollama model names and key names, else ``none``."""

    def __init__(self, settings: Settings) -> None:
        configured = {spec.ollamaName for spec in settings.modelMapping.values()}
        self.models = frozenset(configured | set(settings.slotsPerModel))
        self.keys = frozenset(settings.apiKeys) | frozenset(settings.openAiKeys)

    def model(self, name: str) -> str:
        """The Ollama name as called (the registry may add the ``:latest`` tag Ollama lists) if configured."""
        known = name in self.models or name.removesuffix(":latest") in self.models
        return name if known else NO_LABEL

    def key(self, name: str) -> str:
        return name if name in self.keys else NO_LABEL


def installQueueMetrics(app: FastAPI, registry: CollectorRegistry, settings: Settings) -> None:
    """Register the queue gauges and feed the wait histogram and refusal counter from the app's admission."""
    labels = QueueLabels(settings)
    registry.register(QueueCollector(app, labels))
    wait = Histogram("poweron_queue_wait_seconds", "Time a model call waited in the service for an Ollama slot",
                     ["upstream", "model", "key"], buckets=QUEUE_WAIT_BUCKETS, registry=registry)
    refused = Counter("poweron_queue_refused", "Model calls refused with 503 by admission control (queue_full: no "
                      "room in the queue; queue_timeout: waited [ollama] max_queue_wait_seconds)",
                      ["upstream", "model", "key", "reason"], registry=registry)
    admission: Admission | None = getattr(app.state, "admission", None)
    if admission is None:
        return
    child = LabelCache()
    admission.admissionListeners.append(
        lambda upstream, model, keyName, seconds: child(wait, upstream, labels.model(model),
                                                        labels.key(keyName)).observe(seconds))
    admission.refusalListeners.append(
        lambda upstream, model, keyName, reason: child(refused, upstream, labels.model(model), labels.key(keyName),
                                                       reason).inc())
