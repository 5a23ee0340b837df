"""The Ollama upstreams behind the service, by name: which takes the next request for a model, what is in flight
where, which are down or draining. Routing order per request: the model loaded with the request's runner options,
then free slots, then the shortest queue; among equals the fewest requests in flight (then the fewest picks)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import httpx

from config import Settings
from core.errors import ServiceError
from settings.parsing import DEFAULT_UPSTREAM
from upstream.admission import Admission
from upstream.discovery import UpstreamNode, normaliseModelName
from upstream.ollamaClient import BUSY_RETRY_AFTER_SECONDS, OllamaClient, UpstreamError

logger = logging.getLogger("poweron.upstreams")
MARK_DOWN_CODES = frozenset({"upstream_unavailable"})
"""Failures that take an upstream out of rotation at once (it refused the connection)."""
PROBE_CODES = frozenset({"upstream_error", "upstream_stream_error", "upstream_timeout", "model_not_found"})
"""Failures after which the upstream is probed at once (it may have died, restarted or lost the model)."""


def clientFor(http: httpx.AsyncClient, name: str, url: str, admission: Admission | None,
              settings: Settings) -> OllamaClient:
    """The client of one upstream (admission per upstream and model); error messages name it (the single
    "default" keeps naming its URL)."""
    return OllamaClient(http, url, admission, upstreamName=name,
                        queueNoticeSeconds=settings.ollama.queue_notice_seconds)


class UpstreamPool:
    """Upstream nodes by name plus the per-request bookkeeping routing needs."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient, nodes: Iterable[UpstreamNode] | None = None,
                 admission: Admission | None = None) -> None:
        self.settings = settings
        self.http = http
        self.admission = admission
        if nodes is None:
            nodes = (UpstreamNode(name, url, self.clientFor(name, url), name in settings.drainingUpstreams)
                     for name, url in settings.upstreams.items())
        self.nodes: dict[str, UpstreamNode] = {node.name: node for node in nodes}
        for node in self.nodes.values():
            node.onDown = self.closeQueues
        self.probes: dict[str, asyncio.Task[None]] = {}
        self.failovers = 0

    @classmethod
    def fromClient(cls, settings: Settings, ollama: OllamaClient) -> UpstreamPool:
        """One upstream named "default" around an existing client."""
        return cls(settings, ollama.http, [UpstreamNode(DEFAULT_UPSTREAM, ollama.baseUrl, ollama)], ollama.admission)

    @property
    def slots(self) -> int:
        return self.settings.ollama.num_parallel

    def clientFor(self, name: str, url: str) -> OllamaClient:
        return clientFor(self.http, name, url, self.admission, self.settings)

    def active(self) -> list[UpstreamNode]:
        return [node for node in self.nodes.values() if not node.removed]

    def accepts(self, name: str) -> bool:
        """Whether the upstream of that name takes requests now (admission asks before a waiter goes there)."""
        node = self.nodes.get(name)
        return node is not None and node.routable

    def closeQueues(self, node: UpstreamNode) -> None:
        """The upstream takes no new requests (draining, down, removed): the requests waiting in its admission
        queues move on at once (routing queues each at the next best upstream with the model, or answers 503);
        the ones running there finish."""
        moved = self.admission.evict(node.name) if self.admission is not None else 0
        if moved:
            state = "removed" if node.removed else "draining" if node.draining else "not reachable"
            logger.info("%d requests waiting for ollama upstream %s (%s) move to another upstream with the model "
                        "(or get 503 when none is left)", moved, node.name, state)

    # ------------------------------------------------------------------------------------------ routing

    def occupancy(self, node: UpstreamNode, pulledName: str) -> tuple[int, int, int]:
        """(slots busy, slots, requests waiting) of the model at the upstream: admission's queue when there is
        one, else this service's own count of requests in flight there."""
        queue = self.admission.queues.get((node.name, pulledName)) if self.admission is not None else None
        if queue is not None:
            return queue.limiter.busy, queue.limiter.limit, len(queue.limiter.waiting)
        busy = node.inFlightByModel[normaliseModelName(pulledName)]
        return min(busy, self.slots), self.slots, max(0, busy - self.slots)

    def rank(self, node: UpstreamNode, pulledName: str, numCtx: int | None) -> tuple[int, int, int, int, int]:
        busy, slots, waiting = self.occupancy(node, pulledName)
        return (0 if node.isLoaded(pulledName, numCtx) else 1, 0 if busy < slots else 1, waiting, node.inFlight,
                node.picks)

    def pick(self, ollamaName: str, numCtx: int | None,
             exclude: Iterable[UpstreamNode] = ()) -> tuple[UpstreamNode, str]:
        """The upstream for the next request for ``ollamaName`` and the name it has the model under."""
        excluded = set(map(id, exclude))
        best: tuple[Any, UpstreamNode, str] | None = None
        for node in self.nodes.values():
            if not node.routable or id(node) in excluded:
                continue
            pulledName = node.pulledNameFor(ollamaName)
            if pulledName is None:
                continue
            rank = self.rank(node, pulledName, numCtx)
            if best is None or rank < best[0]:
                best = (rank, node, pulledName)
        if best is None:
            raise self.noUpstreamError(ollamaName)
        return best[1], best[2]

    def anyRoutable(self, exclude: Iterable[UpstreamNode] = ()) -> UpstreamNode:
        """An upstream for a call without a model (the least busy routable one)."""
        excluded = set(map(id, exclude))
        nodes = [node for node in self.nodes.values() if node.routable and id(node) not in excluded]
        if not nodes:
            raise self.noUpstreamError("")
        return min(nodes, key=lambda node: (node.inFlight, node.picks))

    def noUpstreamError(self, ollamaName: str) -> UpstreamError:
        """503: every upstream that has the model is down or draining (404s are the registry's, before this)."""
        nodes = [node for node in self.active() if not ollamaName or node.pulledNameFor(ollamaName) is not None]
        headers = {"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)}
        if len(self.nodes) == 1 and nodes and not nodes[0].reachable:  # one upstream: say why, as before
            return UpstreamError(503, nodes[0].error or "Ollama is not reachable", code="upstream_unavailable",
                                 headers=headers)
        states = ", ".join(f"{node.name}: {'draining' if node.draining else 'not reachable'}" for node in nodes)
        return UpstreamError(503, f"No Ollama upstream can take the request now{f' ({states})' if states else ''}; "
                             "retry shortly", code="upstream_unavailable", headers=headers)

    @staticmethod
    def acquire(node: UpstreamNode, pulledName: str) -> None:
        node.inFlight += 1
        node.picks += 1
        node.inFlightByModel[normaliseModelName(pulledName)] += 1

    @staticmethod
    def release(node: UpstreamNode, pulledName: str) -> None:
        node.inFlight = max(0, node.inFlight - 1)
        key = normaliseModelName(pulledName)
        node.inFlightByModel[key] = max(0, node.inFlightByModel[key] - 1)

    # ------------------------------------------------------------------------------------------ health

    def suspect(self, node: UpstreamNode, error: ServiceError) -> None:
        """A request to ``node`` failed: refused connections take it out at once; other failures probe it now."""
        if error.code in MARK_DOWN_CODES:
            node.markDown(error.message)
        if error.code in MARK_DOWN_CODES | PROBE_CODES:
            self.probeSoon(node)

    def probeSoon(self, node: UpstreamNode) -> None:
        running = self.probes.get(node.name)
        if running is None or running.done():
            self.probes[node.name] = asyncio.get_running_loop().create_task(node.refresh(),
                                                                            name=f"probe-{node.name}")

    async def refreshAll(self) -> list[UpstreamNode]:
        """Refresh every configured upstream at once; returns the ones that came back (or answered first)."""
        nodes = self.active()
        before = [node.reachable for node in nodes]
        await asyncio.gather(*(node.refresh() for node in nodes))
        return [node for node, was in zip(nodes, before) if node.reachable and not was]

    # ------------------------------------------------------------------------------------------ reload

    async def prepare(self, settings: Settings) -> dict[str, UpstreamNode]:
        """The nodes of a new configuration: kept ones (same URL) with their new drain mark, new ones probed
        first, so a request never meets an upstream nobody has checked."""
        nodes: dict[str, UpstreamNode] = {}
        fresh: list[UpstreamNode] = []
        for name, url in settings.upstreams.items():
            current = self.nodes.get(name)
            if current is None or current.url != url:
                current = UpstreamNode(name, url, self.clientFor(name, url))
                fresh.append(current)
            nodes[name] = current
        await asyncio.gather(*(node.refresh() for node in fresh))
        return nodes

    def apply(self, settings: Settings, nodes: dict[str, UpstreamNode]) -> None:
        """Switch to prepared nodes; removed and draining ones finish what they run and take nothing new (what
        waits in their admission queues goes elsewhere)."""
        for name, node in self.nodes.items():
            if nodes.get(name) is not node:
                node.removed = True
        for name, node in nodes.items():
            node.draining = name in settings.drainingUpstreams
        added = sorted(set(nodes) - set(self.nodes))
        removed = sorted(set(self.nodes) - set(nodes))
        closed = [node for node in (*self.nodes.values(), *nodes.values()) if not node.routable]
        self.settings, self.nodes = settings, nodes
        for node in nodes.values():
            node.onDown = self.closeQueues
        for node in closed:
            self.closeQueues(node)
        if added or removed:
            logger.info("ollama upstreams now %s (added: %s; removed: %s)", ", ".join(nodes),
                        ", ".join(added) or "none", ", ".join(removed) or "none")

    def describe(self) -> list[dict[str, Any]]:
        return [node.describe(self.slots) for node in self.nodes.values()]
