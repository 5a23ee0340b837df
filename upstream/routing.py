"""The Ollama client route handlers use (one per request): every call goes to the upstream the pool picks for its
model, and a call that fails before anything reached the client (refused, 503, an error before the first line of
a stream, a daemon gone while a whole answer was being read) is retried once on another upstream with the model.
After the first line of a stream has been handed on, an error ends the stream as before. A call waiting for its
admission slot at an upstream that stops taking requests (drained, down, removed) is queued at the next best
upstream with the model instead (503 with Retry-After when none is left); it is never sent to that upstream. A
moved call keeps the admission deadline it arrived with (``UpstreamClosed.deadline``), and so does a retry after
its wait ran out (queue_timeout): its wait from arrival stays within ``max_queue_wait_seconds``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio

from config import resolveModel
from core.errors import ServiceError
from core.requestContext import RequestMeta
from upstream.contextWindow import embedPayload
from upstream.discovery import UpstreamNode
from upstream.admission import AdmissionRefused, Kind, UpstreamClosed
from upstream.fairQueue import Ticket
from upstream.ollamaClient import OllamaClient, OllamaStream, flattened, midStreamError
from upstream.pool import UpstreamPool

T = TypeVar("T")
RETRY_STATUSES = frozenset({502, 503})
RETRY_CODES = frozenset({"model_not_found"})
Attempt = Callable[[OllamaClient, dict[str, Any], Callable[[], None], "Ticket | None"], Awaitable[T]]
"""One try on one upstream: (its client for this request, payload with the upstream's model name, release, the
admission ticket taken already or None) -> result. A result that holds the upstream (an open stream) calls
release itself when it ends; see ``holds``."""


@dataclass(slots=True)
class Reservation:
    """An upstream picked ahead of the call (``enqueue``): node, its model name, the admission ticket there, and
    the call (path, payload, meta) to queue elsewhere when that upstream stops taking requests. ``handle`` is the
    ticket the caller was given (the first one), by which ``queuedPositions`` and ``openStream`` find this."""

    node: UpstreamNode
    pulledName: str
    ticket: Ticket | None
    handle: Ticket | None
    path: str
    payload: dict[str, Any]
    meta: RequestMeta | None


def isRetryable(error: ServiceError) -> bool:
    return error.status in RETRY_STATUSES or error.code in RETRY_CODES


class PrimedStream:
    """An open stream whose first lines have arrived already (so failing before them could go elsewhere); same
    interface as OllamaStream. Closing it frees its place at the upstream."""

    def __init__(self, stream: OllamaStream, inner: AsyncIterator[list[dict[str, Any]]], first: list[dict[str, Any]],
                 release: Callable[[], None]) -> None:
        self.stream, self.inner, self.first, self.release = stream, inner, first, release
        self.startedAt = stream.startedAt
        self.response = stream.response

    @property
    def upstreamSeconds(self) -> float | None:
        return self.stream.upstreamSeconds

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        try:
            yield self.first
            if self.first[-1].get("done"):
                return
            async for batch in self.inner:
                yield batch
        finally:
            await self.inner.aclose()

    def chunks(self) -> AsyncIterator[dict[str, Any]]:
        return flattened(self.batches())

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            self.release()


class BufferedStream:
    """A stream read to its end already (nothing of it went to the client, so it could be retried whole)."""

    def __init__(self, chunks: list[dict[str, Any]], startedAt: float, upstreamSeconds: float | None) -> None:
        self.buffered, self.startedAt, self.upstreamSeconds = chunks, startedAt, upstreamSeconds

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        for chunk in self.buffered:
            yield chunk

    async def aclose(self) -> None:
        return None


class RoutedOllama:
    """Per-request view of the pool with OllamaClient's call methods; notes the upstream on the request."""

    def __init__(self, pool: UpstreamPool, meta: RequestMeta | None = None) -> None:
        self.pool = pool
        self.meta = meta
        self.reserved: Reservation | None = None

    @property
    def queueNoticeSeconds(self) -> float:
        return self.pool.settings.ollama.queue_notice_seconds

    def enqueue(self, path: str, payload: dict[str, Any], meta: RequestMeta | None) -> Ticket | None:
        """Pick the upstream for the next ``openStream`` now and take a place in its admission queue for the model
        (a stream tells its client the place while it waits); a full queue there tries the next upstream once."""
        self.reserved = self._reserve(path, payload, meta, [], None)
        return self.reserved.ticket

    def _reserve(self, path: str, payload: dict[str, Any], meta: RequestMeta | None, tried: list[UpstreamNode],
                 handle: Ticket | None, deadline: float | None = None) -> Reservation:
        """A place at the best upstream not in ``tried`` (the next one once when that queue is full); ``deadline``
        ends its wait (a request moved from another upstream)."""
        ollamaName, numCtx = self._target(payload, None)
        full = 0
        while True:
            node, pulledName = self._choose(ollamaName, numCtx, tried)
            tried.append(node)
            try:
                sent = {**payload, "model": pulledName or payload.get("model")}
                ticket = self._view(node, deadline).enqueue(path, sent, meta)
            except ServiceError:
                full += 1
                if full > 1 or not self._hasAlternative(ollamaName, numCtx, tried):
                    raise
                continue
            return Reservation(node, pulledName, ticket, handle or ticket, path, payload, meta)

    def refuseIfFull(self, ollamaName: str, kind: Kind = "generate") -> None:
        """503 queue_full at once when the model's queue is full at every upstream that could take the call."""
        refused: ServiceError | None = None
        for node in self.pool.nodes.values():
            pulledName = node.pulledNameFor(ollamaName) if node.routable else None
            if pulledName is None:
                continue
            try:
                self._view(node).refuseIfFull(pulledName, kind)
                return
            except ServiceError as error:
                refused = error
        if refused is not None:
            raise refused

    def queuedPositions(self, ticket: Ticket | None, everySeconds: float) -> AsyncIterator[int]:
        """The ticket's queue place every ``everySeconds`` while it waits (see OllamaClient.queuedPositions); a
        request whose upstream stops taking requests meanwhile moves to the next best one (``_movingPositions``)."""
        reserved = self.reserved
        if reserved is not None and reserved.handle is ticket:
            return self._movingPositions(reserved, everySeconds)
        return self._view(next(iter(self.pool.nodes.values()))).queuedPositions(ticket, everySeconds)

    async def _movingPositions(self, reserved: Reservation, everySeconds: float) -> AsyncIterator[int]:
        """Places while the reserved ticket waits. When its upstream stops taking requests (drained, down,
        removed) the request takes a place at the best other upstream with the model (keeping the deadline its wait
        started with), or gets that 503 with Retry-After when none is left; ``openStream`` then uses the new place."""
        tried = [reserved.node]
        while True:
            positions = self._view(reserved.node).queuedPositions(reserved.ticket, everySeconds)
            try:
                async for position in positions:
                    yield position
                return
            except UpstreamClosed as closed:
                reserved = self._reserve(reserved.path, reserved.payload, reserved.meta, tried, reserved.handle,
                                         closed.deadline)
                self.reserved = reserved
            finally:
                await positions.aclose()

    def _view(self, node: UpstreamNode, deadline: float | None = None) -> OllamaClient:
        return node.client.forRequest(self.meta, deadline)

    def _takeReservation(self, ticket: Ticket | None) -> Reservation | None:
        reserved, self.reserved = self.reserved, None
        return reserved if reserved is not None and reserved.handle is ticket else None

    def _target(self, payload: dict[str, Any], externalName: str | None) -> tuple[str, int | None]:
        spec = resolveModel(self.pool.settings, externalName) if externalName else None
        ollamaName = spec.ollamaName if spec is not None and spec.ollamaName else str(payload.get("model") or "")
        options = payload.get("options")
        numCtx = options.get("num_ctx") if isinstance(options, dict) else None
        return ollamaName, numCtx if isinstance(numCtx, int) else None

    def _choose(self, ollamaName: str, numCtx: int | None, tried: list[UpstreamNode]) -> tuple[UpstreamNode, str]:
        if ollamaName:
            return self.pool.pick(ollamaName, numCtx, tried)
        return self.pool.anyRoutable(tried), ""

    def _note(self, node: UpstreamNode, failedFrom: UpstreamNode | None) -> None:
        if self.meta is not None:
            self.meta.upstream = node.name
            if failedFrom is not None:
                self.meta.failedOver = failedFrom.name

    async def _run(self, payload: dict[str, Any], externalName: str | None, attempt: Attempt[T],
                   holds: bool = False, reserved: Reservation | None = None) -> T:
        """Run ``attempt`` on the best upstream (or the reserved one); once more on the next best when it fails
        retryably. A call whose upstream stopped taking requests while it waited for its slot there goes to the
        next best without that counting as a failover (none left: 503 with Retry-After). Both keep the admission
        deadline of the first wait, so the wait from arrival stays within the longest wait."""
        ollamaName, numCtx = self._target(payload, externalName)
        tried: list[UpstreamNode] = []
        failedFrom: UpstreamNode | None = None
        deadline: float | None = None
        while True:
            if reserved is not None:
                node, pulledName, ticket, reserved = reserved.node, reserved.pulledName, reserved.ticket, None
            else:
                (node, pulledName), ticket = self._choose(ollamaName, numCtx, tried), None
            tried.append(node)
            self._note(node, failedFrom)
            release = self._hold(node, pulledName)
            sent = {**payload, "model": pulledName} if pulledName else payload
            try:
                result = await attempt(self._view(node, deadline), sent, release, ticket)
            except UpstreamClosed as closed:
                release()
                deadline = closed.deadline
                continue
            except ServiceError as error:
                release()
                if isinstance(error, AdmissionRefused) and error.deadline is not None:
                    deadline = error.deadline
                self.pool.suspect(node, error)
                if failedFrom is not None or not isRetryable(error) or \
                        not self._hasAlternative(ollamaName, numCtx, tried):
                    raise
                failedFrom = node
                self.pool.failovers += 1
                continue
            except BaseException:
                release()
                raise
            if not holds:
                release()
            if pulledName:
                node.noteServed(pulledName, numCtx)
            return result

    def _hold(self, node: UpstreamNode, pulledName: str) -> Callable[[], None]:
        """Count the call in flight at the upstream; the function returned (idempotent) ends that."""
        self.pool.acquire(node, pulledName)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pool.release(node, pulledName)

        return release

    def _hasAlternative(self, ollamaName: str, numCtx: int | None, tried: list[UpstreamNode]) -> bool:
        try:
            self._choose(ollamaName, numCtx, tried)
        except ServiceError:
            return False
        return True

    # ---------------------------------------------------------------------------- OllamaClient's calls

    async def postJson(self, path: str, payload: dict[str, Any], externalName: str | None = None,
                       timeout: float | None = None, meta: RequestMeta | None = None) -> Any:
        async def attempt(client: OllamaClient, sent: dict[str, Any], release: Callable[[], None],
                          ticket: Ticket | None) -> Any:
            return await client.postJson(path, sent, externalName, timeout, meta=meta)

        return await self._run(payload, externalName, attempt)

    async def chat(self, payload: dict[str, Any], externalName: str, meta: RequestMeta | None = None) -> dict[str, Any]:
        """Non-streaming /api/chat; an ``error`` answer counts as a failure of that upstream."""
        answer = await self.postJson("/api/chat", {**payload, "stream": False}, externalName, meta=meta)
        if "error" in answer:
            raise midStreamError(str(answer["error"]))
        return answer

    async def embed(self, ollamaName: str, inputs: list[str], externalName: str, dimensions: int | None = None,
                    keepAlive: str | None = None, meta: RequestMeta | None = None, window: int = 0) -> dict[str, Any]:
        payload = embedPayload(ollamaName, inputs, window, False, dimensions, keepAlive)  # too long: refused, not cut
        return await self.postJson("/api/embed", payload, externalName, meta=meta)

    async def openStream(self, path: str, payload: dict[str, Any], externalName: str, meta: RequestMeta | None = None,
                         ticket: Ticket | None = None) -> PrimedStream:
        """Open a stream (on the upstream ``enqueue`` picked, with its ticket) and wait for its first line; errors
        until then may go to another upstream."""
        async def attempt(client: OllamaClient, sent: dict[str, Any], release: Callable[[], None],
                          held: Ticket | None) -> PrimedStream:
            stream = await client.openStream(path, sent, externalName, meta, ticket=held)
            inner = stream.batches()
            try:
                first = await inner.__anext__()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await inner.aclose()
                    await stream.aclose()
                raise
            return PrimedStream(stream, inner, first, release)

        return await self._run(payload, externalName, attempt, holds=True, reserved=self._takeReservation(ticket))

    async def openWholeStream(self, path: str, payload: dict[str, Any], externalName: str) -> BufferedStream:
        """A stream read to its end before anything is passed on (whole answers): any failure may go elsewhere."""
        async def attempt(client: OllamaClient, sent: dict[str, Any], release: Callable[[], None],
                          ticket: Ticket | None) -> BufferedStream:
            stream = await client.openStream(path, sent, externalName)
            try:
                chunks = [chunk async for chunk in stream.chunks()]
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            return BufferedStream(chunks, stream.startedAt, stream.upstreamSeconds or
                                  time.perf_counter() - stream.startedAt)

        return await self._run(payload, externalName, attempt)
