"""The Ollama HTTP client: one shared httpx.AsyncClient and NDJSON streams (failures map in upstreamErrors.py)."""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import orjson

from core.requestContext import RequestMeta
from upstream.admission import DEFAULT_UPSTREAM, Admission, Kind, positionsWhileQueued
from upstream.contextWindow import embedPayload
from upstream.fairQueue import Ticket
from upstream.httpClient import LEAN_TRANSPORT_ATTRIBUTE
from upstream.httpClient import createHttpClient as createHttpClient
from upstream.transport import UpstreamTransport
from upstream.upstreamErrors import BUSY_RETRY_AFTER_SECONDS as BUSY_RETRY_AFTER_SECONDS
from upstream.upstreamErrors import OLLAMA as OLLAMA
from upstream.upstreamErrors import UpstreamError as UpstreamError
from upstream.upstreamErrors import mapStatusError as mapStatusError
from upstream.upstreamErrors import mapTransportError as mapTransportError
from upstream.upstreamErrors import midStreamError as midStreamError

NDJSON_MEDIA_TYPE = "application/x-ndjson"
EMBED_PATHS = frozenset({"/api/embed", "/api/embeddings"})
ADMITTED_PATHS = frozenset({"/api/chat", "/api/generate"}) | EMBED_PATHS
"""Calls that occupy one of Ollama's slots of the model named in the payload, so they pass admission control."""
ANONYMOUS_KEY = "anonymous"
DONE_FINISH_SECONDS = 0.25
"""After a stream's done line, how long to wait for the end of its HTTP body so the connection can be kept."""
NOT_JSON_MESSAGE = "Ollama sent a line that is not JSON"


def splitLines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete non-empty NDJSON lines of ``buffer`` (as bytes, no str decoding) and the incomplete rest."""
    if b"\n" not in buffer:
        return [], buffer
    *complete, rest = buffer.split(b"\n")
    return [line for line in complete if line.strip()], rest


def parseStreamLine(line: bytes) -> dict[str, Any]:
    """One NDJSON line; an ``{"error": ...}`` line (Ollama's mid-stream failure) or a line that is not JSON raises."""
    try:
        chunk = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise UpstreamError(502, NOT_JSON_MESSAGE, code="upstream_error") from None
    if "error" in chunk:
        raise midStreamError(str(chunk["error"]))
    return chunk


def parseLines(lines: list[bytes]) -> tuple[list[dict[str, Any]], UpstreamError | bool | None]:
    """The chunks up to the done line, and how the stream ends: True (done), an error line's error, None (goes on)."""
    batch: list[dict[str, Any]] = []
    for line in lines:
        try:
            chunk = parseStreamLine(line)
        except UpstreamError as error:
            return batch, error
        batch.append(chunk)
        if chunk.get("done"):
            return batch, True
    return batch, None


TRUNCATED_STREAM_MESSAGE = "Ollama's stream ended before it was complete (no final done line)"


async def flattened(batches: AsyncGenerator[list[dict[str, Any]], None]) -> AsyncIterator[dict[str, Any]]:
    """The chunks of ``batches`` one by one; closing this closes ``batches`` (and with it the stream's slot)."""
    try:
        async for batch in batches:
            for chunk in batch:
                yield chunk
    finally:
        await batches.aclose()


class OllamaStream:
    """An open NDJSON response from Ollama; iterate ``chunks()``, always ``aclose()``."""

    def __init__(self, response: httpx.Response, startedAt: float, ticket: Ticket | None = None) -> None:
        self.response = response
        self.startedAt = startedAt
        self.upstreamSeconds: float | None = None
        self.ticket = ticket
        """The admission slot this stream holds; given back at the done line or when the stream is closed."""

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Parsed lines, one list per read (the lines that arrived together, to be passed on together); raises
        UpstreamError on an error line (after the lines before it) or on a stream without ``done:true``."""
        pending = b""
        try:
            async for data in self.response.aiter_bytes():
                lines, pending = splitLines(pending + data)
                batch, ending = parseLines(lines)
                if batch:
                    yield batch
                if ending is not None:
                    if ending is not True:
                        raise ending
                    await self.finishBody()
                    return
            if pending.strip():  # a last line without its newline
                chunk = parseStreamLine(pending)
                yield [chunk]
                if chunk.get("done"):
                    return
        except httpx.HTTPError as exc:
            raise mapTransportError(exc, str(self.response.url.copy_with(path="/")).rstrip("/")) from None
        finally:
            self.upstreamSeconds = time.perf_counter() - self.startedAt
            self.releaseSlot()
        raise UpstreamError(502, TRUNCATED_STREAM_MESSAGE, code="upstream_stream_error")

    def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Parsed lines one by one."""
        return flattened(self.batches())

    async def finishBody(self) -> None:
        """Ollama ends the chunked body just after the done line: read that end (briefly) so the connection is
        reused instead of closed (a lean response only; httpx's own responses close as before)."""
        finish = getattr(self.response, "finish", None)
        if finish is not None:
            await finish(DONE_FINISH_SECONDS)

    def releaseSlot(self) -> None:
        if self.ticket is not None:
            self.ticket.release()

    async def aclose(self) -> None:
        self.releaseSlot()
        await self.response.aclose()


class OllamaClient:
    """Calls to Ollama's native API. Builds fresh requests (the caller's Host header is never forwarded).

    ``upstreamName`` names the daemon for admission (per upstream and model); messages never name its URL."""

    def __init__(self, http: httpx.AsyncClient, baseUrl: str, admission: Admission | None = None,
                 upstreamName: str = DEFAULT_UPSTREAM, queueNoticeSeconds: float = 3.0) -> None:
        self.http = http
        self.baseUrl = baseUrl.rstrip("/")
        lean: UpstreamTransport | None = getattr(http, LEAN_TRANSPORT_ATTRIBUTE, None)
        self.lean = lean if lean is not None and lean.serves(self.baseUrl) else None
        """The lean transport when it serves this upstream (plain http, named to createHttpClient or a reload)."""
        self.upstreamName = upstreamName
        self.urls: dict[str, httpx.URL] = {}
        """Parsed URL per path (httpx re-parses a URL string on every request)."""
        self.admission = admission
        """Admission control: model calls made for a request (``meta`` given) wait here for one of the model's slots."""
        self.queueNoticeSeconds = queueNoticeSeconds
        """How often a stream waiting for its slot tells its client the queue position."""
        self.meta: RequestMeta | None = None
        """The request this view of the client calls for (``forRequest``); None for the service's own calls."""
        self.deadline: float | None = None
        """End of the admission wait of this view's calls when the request brings one from another upstream."""

    def forRequest(self, meta: RequestMeta | None, deadline: float | None = None) -> OllamaClient:
        """A view of this client (same connections, same admission) whose model calls are made for one request:
        they wait for their admission slot under the request's key name and record the wait on ``meta``; a
        ``deadline`` (a request moved here from another upstream) ends that wait instead of the longest wait."""
        view = copy.copy(self)
        view.meta, view.deadline = meta, deadline
        return view

    def enqueue(self, path: str, payload: dict[str, Any], meta: RequestMeta | None) -> Ticket | None:
        """The admission ticket of one model call (admitted or queued; 503 when the queue is full); None when the
        call needs none (no request behind it, e.g. warm-up and discovery, or no admission configured)."""
        meta = meta or self.meta
        if meta is None or self.admission is None or path not in ADMITTED_PATHS:
            return None
        kind: Kind = "embed" if path in EMBED_PATHS else "generate"
        return self.admission.enqueue(self.upstreamName, str(payload.get("model", "")),
                                      meta.keyName or ANONYMOUS_KEY, kind, self.deadline)

    def refuseIfFull(self, ollamaName: str, kind: Kind = "generate") -> None:
        """503 queue_full at once when this request's model call would find the model's queue full (before the
        route renders a document or builds a payload for nothing)."""
        if self.meta is not None and self.admission is not None:
            self.admission.refuseIfFull(self.upstreamName, ollamaName, self.meta.keyName or ANONYMOUS_KEY, kind)

    async def waitAdmitted(self, ticket: Ticket | None, meta: RequestMeta | None) -> None:
        """Until the ticket holds its slot (503 queue_timeout after the longest wait); the wait goes on ``meta``."""
        meta = meta or self.meta
        if ticket is None or self.admission is None:
            return
        try:
            await self.admission.wait(ticket)
        finally:
            if meta is not None:
                meta.queueSeconds = (meta.queueSeconds or 0.0) + ticket.queueSeconds

    def queuedPositions(self, ticket: Ticket | None, everySeconds: float) -> AsyncIterator[int]:
        """The ticket's queue position every ``everySeconds`` while it waits (admission.positionsWhileQueued)."""
        return positionsWhileQueued(ticket, lambda: self.waitAdmitted(ticket, None), everySeconds)

    async def admit(self, path: str, payload: dict[str, Any], meta: RequestMeta | None) -> Ticket | None:
        ticket = self.enqueue(path, payload, meta)
        try:
            await self.waitAdmitted(ticket, meta)
        except BaseException:
            if ticket is not None:
                ticket.release()
            raise
        return ticket

    async def send(self, method: str, path: str, content: bytes | None, timeout: float | None, stream: bool) -> Any:
        """One call to Ollama: straight through the lean transport when createHttpClient mounted one, else through
        httpx. The response is read to the end unless ``stream``; httpx's exceptions either way."""
        timeouts = httpx.Timeout(timeout).as_dict() if timeout else None
        if self.lean is not None:
            response = await self.lean.send(method, self.url(path), content, timeouts or self.http.timeout.as_dict())
            if not stream:
                await response.aread()
            return response
        request = self.http.build_request(method, self.url(path), content=content,
                                          headers={"Content-Type": "application/json"} if content else None,
                                          extensions={"timeout": timeouts} if timeouts else None)
        return await self.http.send(request, stream=stream)

    def url(self, path: str) -> httpx.URL:
        parsed = self.urls.get(path)
        if parsed is None:
            parsed = self.urls[path] = httpx.URL(self.baseUrl + path)
        return parsed

    async def getJson(self, path: str, timeout: float | None = None) -> Any:
        return await self._requestJson("GET", path, None, None, timeout)

    async def postJson(self, path: str, payload: dict[str, Any], externalName: str | None = None,
                       timeout: float | None = None, meta: RequestMeta | None = None) -> Any:
        """POST and parse; a model call made for a request (``meta``) holds an admission slot while it runs."""
        ticket = await self.admit(path, payload, meta)
        try:
            return await self._requestJson("POST", path, payload, externalName, timeout)
        finally:
            if ticket is not None:
                ticket.release()

    async def _requestJson(self, method: str, path: str, payload: dict[str, Any] | None,
                           externalName: str | None, timeout: float | None) -> Any:
        content = orjson.dumps(payload) if payload is not None else None
        try:
            response = await self.send(method, path, content, timeout, stream=False)
        except httpx.HTTPError as exc:
            raise mapTransportError(exc, self.baseUrl) from None
        if response.status_code != 200:
            raise mapStatusError(response.status_code, response.content, externalName)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise UpstreamError(502, "Ollama sent an answer that is not JSON", code="upstream_error") from None

    async def chat(self, payload: dict[str, Any], externalName: str, meta: RequestMeta | None = None) -> dict[str, Any]:
        """Non-streaming /api/chat; returns Ollama's single answer object."""
        answer = await self.postJson("/api/chat", {**payload, "stream": False}, externalName, meta=meta)
        if "error" in answer:
            raise midStreamError(str(answer["error"]))
        return answer

    async def openStream(self, path: str, payload: dict[str, Any], externalName: str, meta: RequestMeta | None = None,
                         ticket: Ticket | None = None) -> OllamaStream:
        """Start a streaming call; an upstream error status is raised here, before any byte goes to the client.
        The call first waits for its admission slot (or uses ``ticket``, admitted already); the stream holds it."""
        if ticket is None:
            ticket = await self.admit(path, payload, meta)
        try:
            return await self._openStream(path, payload, externalName, ticket)
        except BaseException:
            if ticket is not None:
                ticket.release()
            raise

    async def _openStream(self, path: str, payload: dict[str, Any], externalName: str,
                          ticket: Ticket | None) -> OllamaStream:
        startedAt = time.perf_counter()
        try:
            response = await self.send("POST", path, orjson.dumps({**payload, "stream": True}), None, stream=True)
        except httpx.HTTPError as exc:
            raise mapTransportError(exc, self.baseUrl) from None
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise mapStatusError(response.status_code, body, externalName)
        return OllamaStream(response, startedAt, ticket)

    async def embed(self, ollamaName: str, inputs: list[str], externalName: str, dimensions: int | None = None,
                    keepAlive: str | None = None, meta: RequestMeta | None = None, window: int = 0) -> dict[str, Any]:
        payload = embedPayload(ollamaName, inputs, window, False, dimensions, keepAlive)  # too long: refused, not cut
        return await self.postJson("/api/embed", payload, externalName, meta=meta)

    async def version(self, timeout: float | None = None) -> str:
        answer = _expectObject(await self.getJson("/api/version", timeout), "/api/version")
        return str(answer.get("version", ""))

    async def tags(self, timeout: float | None = None) -> list[dict[str, Any]]:
        models = _expectObject(await self.getJson("/api/tags", timeout), "/api/tags").get("models") or []
        if not isinstance(models, list):
            raise unexpectedShape("/api/tags")
        return [entry for entry in models if isinstance(entry, dict)]

    async def show(self, ollamaName: str, timeout: float | None = None) -> dict[str, Any]:
        return _expectObject(await self.postJson("/api/show", {"model": ollamaName}, ollamaName, timeout), "/api/show")


def unexpectedShape(path: str) -> UpstreamError:
    return UpstreamError(502, f"Ollama answered {path} with an unexpected shape", code="upstream_error")


def _expectObject(answer: Any, path: str) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise unexpectedShape(path)
    return answer
