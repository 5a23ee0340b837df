"""Labelled children of Prometheus metrics, looked up once per label set.

``prometheus_client``'s ``labels()`` validates and joins its arguments under a lock on every call; a completed
request records up to seven of them, about 4 % of its CPU. The label sets are bounded (route templates, configured
model, key and upstream names, status and error codes), so each child is kept after its first use, as
prometheus_client keeps it anyway."""

from __future__ import annotations

from typing import Any


class LabelCache:
    """``cache(metric, *values)`` is ``metric.labels(*values)``, remembered per metric and label set."""

    def __init__(self) -> None:
        self.children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def __call__(self, metric: Any, *values: str) -> Any:
        key = (id(metric), values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = metric.labels(*values)
        return child
