"""Client disconnects against the real service process: a client that goes away mid-stream, mid-upload, while
waiting for an answer or while its PDF renders frees everything. After each disconnect, within a bounded wait: the
Ollama stub saw the upstream request closed (or never got one), no request of the service is in flight any more
(``/metrics``), the key's one concurrency slot is free (the next request is served at once, not refused with 429),
no render keeps running, and the access line says ``client_disconnected`` (status 499 when no answer had started).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pymupdf
import pytest

from documents.documentRender import RenderJob
from documents.renderWorkers import RenderPool
from tests.conftest import API_KEY, OPENAI_KEY, TEST_INI, ServiceProcess, childPids
from tests.documentSamples import makeImage
from tests.ollamaStub import StubServer

pytestmark = pytest.mark.e2e
OPENAI_HEADERS = {"Authorization": f"Bearer {OPENAI_KEY}"}
API_HEADERS = {"X-API-Key": API_KEY}
TEXT = "poweron-text-general"
FREED_WITHIN_SECONDS = 3.0
"""Bounded wait for the service to notice the disconnect and free everything (it takes milliseconds)."""
SLOW_STREAM = {"chunks": 40, "chunkDelayMs": 200}
"""An 8-second upstream answer: a stream still open after the wait above was never closed."""
SLOW_PDF_PATHS = 2500
"""Semi-transparent Bézier shapes on one A4 page: about 6 s to render at the default pixel budget, so a render that
went on after its client left is still burning CPU after the bounded wait."""
SERVICE_ENV = {
    "PRIVATE_LLM_RATELIMIT__MAX_CONCURRENT_PER_KEY": "1",
    "PRIVATE_LLM_DOCUMENTS__RENDER_WORKERS": "1",
    "PRIVATE_LLM_DOCUMENTS__PRESTART_WORKERS": "true",
    "PRIVATE_LLM_DOCUMENTS__RENDER_TIMEOUT_SECONDS": "40",
    "PRIVATE_LLM_OLLAMA__READ_TIMEOUT": "30",
}
IN_FLIGHT = re.compile(r"^poweron_requests_in_flight (\S+)$", re.MULTILINE)
RESET_LINGER = b"\x01\x00\x00\x00\x00\x00\x00\x00"
"""SO_LINGER on, 0 s: close() resets the connection, as when a client process dies or a phone loses its network."""


@pytest.fixture(scope="module")
def service(stub: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    ini = tmp_path_factory.mktemp("disconnects") / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    with ServiceProcess(ini, {"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl, **SERVICE_ENV}) as process:
        waitUntil(lambda: bool(httpx.get(process.baseUrl + "/v1/models", headers=OPENAI_HEADERS).json()["data"]),
                  10.0, "the service never listed the stub's models")
        yield process
    log = process.logText()
    assert "Traceback" not in log, "a disconnect ended in an unhandled exception:\n" + log[-3000:]


@pytest.fixture
def slowStub(stubControl: httpx.Client) -> httpx.Client:
    stubControl.post("/_stub/config", json=SLOW_STREAM).raise_for_status()
    return stubControl


def waitUntil(condition: Callable[[], bool], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        time.sleep(0.05)


def otherRequestsInFlight(service: ServiceProcess) -> int:
    """poweron_requests_in_flight without the scrape itself."""
    text = httpx.get(service.baseUrl + "/metrics", headers=OPENAI_HEADERS, timeout=5).text
    return int(float(IN_FLIGHT.search(text).group(1))) - 1


def stubEvents(stubControl: httpx.Client, kind: str, path: str) -> list[dict[str, Any]]:
    events = stubControl.get("/_stub/events", params={"type": kind}).json()["events"]
    return [event for event in events if event["path"] == path]


def stubRequests(stubControl: httpx.Client, path: str) -> int:
    return stubControl.get("/_stub/requests", params={"path": path}).json()["count"]


def accessLine(service: ServiceProcess, requestId: str) -> dict[str, Any]:
    for line in service.logText().splitlines():
        if line.startswith("{") and requestId in line:
            entry = orjson.loads(line)
            if entry["requestId"] == requestId:
                return entry
    pytest.fail(f"no access line for request {requestId}")


def admissionIdle(service: ServiceProcess) -> bool:
    """No model call holds or waits for an Ollama slot (``/health`` queues)."""
    queues = httpx.get(service.baseUrl + "/health", headers=API_HEADERS, timeout=5).json()["queues"]
    return all(queue["slotsBusy"] == 0 and queue["queued"] == 0 for queue in queues)


def assertFreed(service: ServiceProcess, headers: dict[str, str], requestId: str, status: int | None) -> None:
    """Nothing in flight any more; the key's single concurrency slot is free (its next request is served at once;
    a leaked slot would make it a 429); the departed request is logged as such."""
    waitUntil(lambda: otherRequestsInFlight(service) == 0, FREED_WITHIN_SECONDS,
              "a request of the departed client is still in flight")
    waitUntil(lambda: admissionIdle(service), FREED_WITHIN_SECONDS,
              "an Ollama slot (admission control) of the departed request is still held or queued")
    path = "/v1/models" if "Authorization" in headers else "/api/models"
    following = httpx.get(service.baseUrl + path, headers=headers, timeout=5)
    assert following.status_code == 200, following.text
    entry = accessLine(service, requestId)
    assert entry["error"] == "client_disconnected", entry
    if status is not None:
        assert entry["status"] == status, entry


def assertUpstreamClosed(stubControl: httpx.Client, path: str, kind: str = "disconnect") -> None:
    waitUntil(lambda: bool(stubEvents(stubControl, kind, path)), FREED_WITHIN_SECONDS,
              f"the service kept the upstream {path} request open after its client left")


def readUntilFirstPiece(lines: Iterator[str], isPiece: Callable[[str], bool]) -> None:
    """Read the stream until the first generated piece arrived (the upstream answer is then running)."""
    for line in lines:
        if isPiece(line):
            return
    pytest.fail("the stream ended before the first generated piece")


def withId(headers: dict[str, str]) -> tuple[dict[str, str], str]:
    requestId = uuid.uuid4().hex
    return {**headers, "X-Request-ID": requestId}, requestId


# ------------------------------------------------------------------------------------------------ mid-stream


def test_midStreamChatCompletions_closesUpstreamAndFreesTheSlot(service: ServiceProcess, slowStub) -> None:
    headers, requestId = withId(OPENAI_HEADERS)
    body = {"model": TEXT, "messages": [{"role": "user", "content": "Hallo"}], "stream": True}
    with httpx.Client(base_url=service.baseUrl, headers=headers, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # held until the connection is closed below
            readUntilFirstPiece(lines, lambda line: '"content":"' in line and '""' not in line)
            assert otherRequestsInFlight(service) == 1
    assertUpstreamClosed(slowStub, "/api/chat")
    assertFreed(service, OPENAI_HEADERS, requestId, None)


STREAMED_ANALYSIS = {
    "analyzeNdjson": ("/api/analyze", {"stream": "ndjson"}, {}),
    "analyzeSse": ("/api/analyze", {"stream": "true"}, {"Accept": "text/event-stream"}),
    "textNdjson": ("/api/text", {"stream": True}, {}),
    "textSse": ("/api/text", {"stream": "sse"}, {}),
}


@pytest.mark.parametrize("case", list(STREAMED_ANALYSIS))
def test_midStreamAnalysisApi_closesUpstreamAndFreesTheSlot(service: ServiceProcess, slowStub, case: str) -> None:
    path, streamField, extraHeaders = STREAMED_ANALYSIS[case]
    headers, requestId = withId({**API_HEADERS, **extraHeaders})
    if path == "/api/analyze":
        request = {"files": {"file": ("photo.png", makeImage(640, 480), "image/png")},
                   "data": {"prompt": "Describe", **streamField}}
    else:
        request = {"json": {"prompt": "Neutralise", "text": "Hans Muster", **streamField}}
    with httpx.Client(base_url=service.baseUrl, headers=headers, timeout=10) as client:
        with client.stream("POST", path, **request) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            readUntilFirstPiece(lines, lambda line: '"type":"delta"' in line)
            assert otherRequestsInFlight(service) == 1
    assertUpstreamClosed(slowStub, "/api/chat")
    assertFreed(service, API_HEADERS, requestId, None)


# ------------------------------------------------------------------------------- waiting for a whole answer


WHOLE_ANSWERS = {
    "chat": ("/v1/chat/completions", OPENAI_HEADERS, {"model": TEXT, "messages": [{"role": "user", "content": "Hi"}]},
             "/api/chat", None),
    "text": ("/api/text", API_HEADERS, {"prompt": "Neutralise", "text": "Hans Muster"}, "/api/chat", None),
    "embeddings": ("/v1/embeddings", OPENAI_HEADERS, {"model": "poweron-embed", "input": "Hallo"}, "/api/embed",
                   "hang"),
    "embed": ("/api/embed", API_HEADERS, {"texts": ["Hallo"]}, "/api/embed", "hang"),
}


@pytest.mark.parametrize("case", list(WHOLE_ANSWERS))
def test_givingUpOnAWholeAnswer_closesUpstreamAndFreesTheSlot(service: ServiceProcess, slowStub, case: str) -> None:
    path, keyHeaders, body, upstreamPath, fault = WHOLE_ANSWERS[case]
    if fault:  # Ollama accepts the request and never answers (a model stuck loading)
        slowStub.post("/_stub/config", json={"fault": fault, "faultPaths": [upstreamPath]}).raise_for_status()
    headers, requestId = withId(keyHeaders)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(service.baseUrl + path, headers=headers, json=body, timeout=httpx.Timeout(5, read=1.0))
    assertUpstreamClosed(slowStub, upstreamPath, "faultClientGone" if fault else "disconnect")
    assertFreed(service, keyHeaders, requestId, 499)


# ------------------------------------------------------------------------------------------------ mid-upload


def sendPartOfUpload(service: ServiceProcess, path: str, headers: dict[str, str], contentType: str, head: bytes,
                     totalBytes: int) -> None:
    """Announce ``totalBytes`` of body, send ``head`` and a little more slowly, then reset the connection while the
    service is still reading the body (it has the request in flight)."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {contentType}",
                 f"Content-Length: {totalBytes}", *(f"{name}: {value}" for name, value in headers.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + head)
        for _ in range(3):
            time.sleep(0.1)
            sock.sendall(b"a" * 16384)
        waitUntil(lambda: otherRequestsInFlight(service) == 1, FREED_WITHIN_SECONDS,
                  "the service never started on the upload")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)


def test_midUploadAnalyzeMultipart_freesEverythingAndNeverCallsOllama(service: ServiceProcess, slowStub) -> None:
    boundary = "disconnect-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nDescribe\r\n--{boundary}\r\n'
            'Content-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode() + b"\x89PNG\r\n\x1a\n"
    headers, requestId = withId(API_HEADERS)
    sendPartOfUpload(service, "/api/analyze", headers, f"multipart/form-data; boundary={boundary}", head,
                     8 * 1024 * 1024)
    assertFreed(service, API_HEADERS, requestId, 499)
    assert stubRequests(slowStub, "/api/chat") == 0


JSON_UPLOADS = {
    "embeddings": ("/v1/embeddings", OPENAI_HEADERS, b'{"model": "poweron-embed", "input": ["', "/api/embed"),
    "text": ("/api/text", API_HEADERS, b'{"prompt": "Neutralise", "text": "', "/api/chat"),
    "analyzeJson": ("/api/analyze", API_HEADERS, b'{"prompt": "Describe", "file": "', "/api/chat"),
}


@pytest.mark.parametrize("case", list(JSON_UPLOADS))
def test_midUploadJsonBody_freesEverythingAndNeverCallsOllama(service: ServiceProcess, slowStub, case: str) -> None:
    path, keyHeaders, head, upstreamPath = JSON_UPLOADS[case]
    headers, requestId = withId(keyHeaders)
    sendPartOfUpload(service, path, headers, "application/json", head, 4 * 1024 * 1024)
    assertFreed(service, keyHeaders, requestId, 499)
    assert stubRequests(slowStub, upstreamPath) == 0


# ------------------------------------------------------------------------------------------- while rendering


PREVIEW_SLOW_PDF_PATHS = 20_000
"""Curves that make even a thumbnail (28,000 pixels) take ~3 s to render."""


def slowPdf(paths: int = SLOW_PDF_PATHS) -> bytes:
    """One A4 page of many overlapping semi-transparent curves: deterministic and slow to rasterise."""
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    shape = page.new_shape()
    rng = random.Random(7)
    for _ in range(paths):
        shape.draw_bezier(*(pymupdf.Point(rng.uniform(0, 595), rng.uniform(0, 842)) for _ in range(4)))
        shape.finish(color=(rng.random(), 0, 0), fill=(0, rng.random(), 1), width=rng.uniform(0.5, 3),
                     fill_opacity=0.5)
    shape.commit()
    return doc.tobytes(deflate=True)


def cpuTicks(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def childrenBusy(service: ServiceProcess, seconds: float = 0.4) -> bool:
    """True while the service's child processes (the render workers) burn CPU: over 40 % of a core."""
    pids = childPids(service.process.pid)
    before = cpuTicks(pids)
    time.sleep(seconds)
    return cpuTicks(pids) - before > 0.4 * seconds * os.sysconf("SC_CLK_TCK")


def multipartRequest(path: str, headers: dict[str, str], files: dict, data: dict) -> bytes:
    request = httpx.Request("POST", "http://127.0.0.1" + path, headers=headers, files=files, data=data)
    body = request.read()
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in request.headers.items() if name.lower() not in
               ("host", "content-length"))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def abandonWhileRendering(service: ServiceProcess, pdf: bytes, stream: bool, path: str = "/api/analyze") -> None:
    headers, requestId = withId(API_HEADERS)
    fields = {"prompt": "Describe", "stream": "true" if stream else "false"} if path == "/api/analyze" else {}
    raw = multipartRequest(path, headers, {"file": ("slow.pdf", pdf, "application/pdf")}, fields)
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        sock.sendall(raw)
        waitUntil(lambda: childrenBusy(service), 5.0, "no render worker started on the PDF")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
    waitUntil(lambda: not childrenBusy(service), FREED_WITHIN_SECONDS, "the render went on after its client left")
    assertFreed(service, API_HEADERS, requestId, 499)


def test_whileRendering_theRenderIsStoppedAndOllamaNeverCalled(service: ServiceProcess, slowStub) -> None:
    pdf = slowPdf()
    abandonWhileRendering(service, pdf, stream=False)
    abandonWhileRendering(service, pdf, stream=True)
    assert stubRequests(slowStub, "/api/chat") == 0
    slowStub.post("/_stub/reset").raise_for_status()
    following = httpx.post(service.baseUrl + "/api/analyze", headers=API_HEADERS, timeout=60,
                           files={"file": ("slow.pdf", pdf, "application/pdf")}, data={"prompt": "Describe"})
    assert following.status_code == 200, following.text
    # the same document renders fine afterwards, and rendering it takes long enough for the disconnects above to
    # have happened mid-render (they waited for a busy worker first)
    assert following.json()["durations"]["renderMs"] >= 1000
    assert stubRequests(slowStub, "/api/chat") == 1


def test_whilePreviewRenders_theRenderIsStopped(service: ServiceProcess, slowStub) -> None:
    pdf = slowPdf(PREVIEW_SLOW_PDF_PATHS)
    abandonWhileRendering(service, pdf, stream=False, path="/api/preview")
    following = httpx.post(service.baseUrl + "/api/preview", headers=API_HEADERS, timeout=60,
                           files={"file": ("slow.pdf", pdf, "application/pdf")})
    assert following.status_code == 200 and following.json()["thumbnails"], following.text


async def test_anAbandonedRenderIsKilledWithoutFailingAnotherRequestsRender() -> None:
    """Two workers, two renders: the abandoned one's worker is killed (the pool is replaced), and the other render,
    whose worker went with it, is rendered again transparently (not reported as a crash of its document)."""
    pool = RenderPool(2, 60)
    job = RenderJob(slowPdf(600), (), 5, 2_097_152, 50_000_000)
    try:
        await pool.warmUp()
        workers = [process for process in pool.executor._processes.values()]
        kept = asyncio.ensure_future(pool.render(job))
        abandoned = asyncio.ensure_future(pool.render(job))
        await asyncio.sleep(0.5)
        assert not kept.done() and not abandoned.done()
        abandoned.cancel()
        await asyncio.sleep(0.5)
        assert not any(process.is_alive() for process in workers), "the abandoned render's worker still runs"
        document = await asyncio.wait_for(kept, 30)
        assert document.pages == [1] and abandoned.cancelled()
        assert (pool.abandoned, pool.restarts) == (1, 1)
    finally:
        await pool.close()


def test_whileQueuedForAnOllamaSlot_thePlaceInTheQueueIsFreed(stub: StubServer, slowStub, tmp_path: Path) -> None:
    """One Ollama slot, held by a slow stream of the OpenAI key; the analysis key's stream waits in the queue (it
    already tells its place) and its client leaves: the place is given back, Ollama never sees the request."""
    ini = tmp_path / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    env = {"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl, "PRIVATE_LLM_OLLAMA__NUM_PARALLEL": "1",
           "PRIVATE_LLM_OLLAMA__QUEUE_NOTICE_SECONDS": "0.1"}
    slowStub.post("/_stub/config", json={"replyText": "word " * 200, "chunks": 200}).raise_for_status()  # 40 s
    with ServiceProcess(ini, env) as service:
        waitUntil(lambda: bool(httpx.get(service.baseUrl + "/v1/models", headers=OPENAI_HEADERS).json()["data"]),
                  10.0, "the service never listed the stub's models")
        holdBody = {"model": TEXT, "messages": [{"role": "user", "content": "Hallo"}], "stream": True}
        with httpx.Client(base_url=service.baseUrl, timeout=10) as holder, \
                holder.stream("POST", "/v1/chat/completions", json=holdBody, headers=OPENAI_HEADERS) as held:
            heldLines = held.iter_lines()  # referenced: a collected iterator would close the held stream
            readUntilFirstPiece(heldLines, lambda line: '"content":"' in line and '""' not in line)
            chatsBefore = stubRequests(slowStub, "/api/chat")
            with httpx.Client(base_url=service.baseUrl, timeout=10) as waiter, \
                    waiter.stream("POST", "/api/text", headers=API_HEADERS,
                                  json={"prompt": "Neutralise", "text": "Hans Muster", "stream": True}) as queued:
                events = queued.iter_lines()
                assert next(events).startswith('{"type":"start"')
                assert next(events) == '{"type":"queued","position":1}'
            waitUntil(lambda: httpx.get(service.baseUrl + "/health", headers=API_HEADERS).json()["queues"][0]["queued"]
                      == 0,
                      FREED_WITHIN_SECONDS, "the departed request kept its place in the queue")
            assert stubRequests(slowStub, "/api/chat") == chatsBefore
        waitUntil(lambda: admissionIdle(service), FREED_WITHIN_SECONDS, "the held slot was not given back")
