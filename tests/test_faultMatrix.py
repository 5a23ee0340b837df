"""Upstream fault matrix: every Ollama-backed route of the real service process against every fault of the stub.

For each fault and route family: the status, code and message are the documented ones (docu/architecture.md,
"Upstream faults"), the answer comes within the configured timeouts, and once the fault is over a normal request
on the SAME service process succeeds (no restart, no poisoned connection pool). The /v1 chat routes are called
with the real openai SDK (max_retries=0); a stream error is also checked on the wire (error frame, then [DONE]).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import API_KEY, OPENAI_KEY, TEST_INI, ServiceProcess, assertNoNetworkViolation
from tests.documentSamples import makeImage, makePdf
from tests.ollamaStub import BUSY_MESSAGE, KIND_SCHEDULER, MIDSTREAM_ERROR, StubServer

pytestmark = pytest.mark.e2e

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 1.5
MARGIN = 3.0
"""Generous: the 2-core machine runs other test suites at the same time."""
SLOW_BELOW_MS = 500
SLOW_ABOVE_MS = int(READ_TIMEOUT * 1000) + 1500
RESTART_LOAD = 4
"""Requests in flight when the stub restarts (the pool has MAX_CONNECTIONS connections)."""
MAX_CONNECTIONS = 6
BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
API_HEADERS = {"X-API-Key": API_KEY}
PNG = makeImage(64, 48)
PDF = makePdf(2)


@dataclass
class Outcome:
    """What a client saw: the HTTP status, and for a stream that had started, the error event it ended with."""

    status: int
    code: str | None = None
    message: str = ""
    retryAfter: str | None = None
    streamError: bool = False
    text: str = ""
    elapsed: float = 0.0


@dataclass
class Harness:
    stub: StubServer
    service: ServiceProcess
    http: httpx.Client
    control: httpx.Client
    sdk: openai.OpenAI

    def setFault(self, fault: str | None, **extra: Any) -> None:
        self.control.post("/_stub/config", json={"fault": fault, **extra}).raise_for_status()

    def events(self, kind: str) -> list[dict]:
        return self.control.get("/_stub/events", params={"type": kind}).json()["events"]

    def inFlight(self) -> float:
        """poweron_requests_in_flight, the scrape itself included."""
        text = self.http.get("/metrics", headers=API_HEADERS).text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("poweron_requests_in_flight ")))

    def waitReady(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.http.get("/health/readiness").status_code != 200:
            assert time.monotonic() < deadline, "the service did not see Ollama again"
            time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ the routes


def _sdkFailure(exc: openai.APIError) -> Outcome:
    body = exc.body if isinstance(exc.body, dict) else {}
    if isinstance(exc, openai.APIStatusError):
        return Outcome(exc.status_code, exc.code, str(body.get("message", exc.message)),
                       exc.response.headers.get("retry-after"))
    if isinstance(exc, openai.APIConnectionError):
        return Outcome(0, None, f"connection failed: {exc!r}")
    return Outcome(200, exc.code, exc.message, streamError=True)  # an error event in a stream that had started


def v1ChatStream(h: Harness) -> Outcome:
    try:
        stream = h.sdk.chat.completions.create(model="poweron-text-general", stream=True,
                                               messages=[{"role": "user", "content": "Hello"}])
        parts, finish = [], None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    except openai.APIError as exc:
        return _sdkFailure(exc)
    return Outcome(200, text="".join(parts) if finish == "stop" else "")


def v1Chat(h: Harness) -> Outcome:
    try:
        answer = h.sdk.chat.completions.create(model="poweron-text-general",
                                               messages=[{"role": "user", "content": "Hello"}])
    except openai.APIError as exc:
        return _sdkFailure(exc)
    return Outcome(200, text=answer.choices[0].message.content or "")


def _jsonOutcome(response: httpx.Response, answerOf: Callable[[dict], str]) -> Outcome:
    body = response.json()
    if response.status_code == 200:
        return Outcome(200, text=answerOf(body))
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    return Outcome(response.status_code, error.get("code"), error.get("message") or error.get("detail") or "",
                   response.headers.get("retry-after"))


def v1Embeddings(h: Harness) -> Outcome:
    response = h.http.post("/v1/embeddings", headers=BEARER, json={"model": "poweron-embed", "input": ["Hello"]})
    return _jsonOutcome(response, lambda body: f"{len(body['data'][0]['embedding'])} dimensions")


def apiAnalyze(h: Harness) -> Outcome:
    response = h.http.post("/api/analyze", headers=API_HEADERS, data={"prompt": "What is this?"},
                           files={"file": ("red.png", PNG, "image/png")})
    return _jsonOutcome(response, lambda body: body["answer"])


def apiAnalyzePdf(h: Harness) -> Outcome:
    response = h.http.post("/api/analyze", headers=API_HEADERS, data={"prompt": "Transcribe", "pages": "1-2"},
                           files={"file": ("two.pdf", PDF, "application/pdf")})
    return _jsonOutcome(response, lambda body: body["answer"])


def apiText(h: Harness) -> Outcome:
    response = h.http.post("/api/text", headers=API_HEADERS, json={"prompt": "Summarise", "text": "Hello"})
    return _jsonOutcome(response, lambda body: body["answer"])


def apiTextStream(h: Harness) -> Outcome:
    with h.http.stream("POST", "/api/text", headers=API_HEADERS,
                       json={"prompt": "Summarise", "text": "Hello", "stream": "ndjson"}) as response:
        if response.status_code != 200:
            response.read()
            return _jsonOutcome(response, lambda body: "")
        events = [orjson.loads(line) for line in response.iter_lines() if line]
    last = events[-1]
    assert events[0]["type"] == "start" and last["type"] in ("done", "error"), events
    if last["type"] == "error":
        assert last["status"] in (502, 503, 504), last
        return Outcome(200, last["code"], last["detail"], streamError=True)
    return Outcome(200, text=last["answer"])


def apiEmbed(h: Harness) -> Outcome:
    response = h.http.post("/api/embed", headers=API_HEADERS, json={"texts": ["Hello"]})
    return _jsonOutcome(response, lambda body: f"{body['dimensions']} dimensions")


ROUTES: dict[str, tuple[Callable[[Harness], Outcome], str, bool]] = {
    # name: (caller, the Ollama path it uses, whether the client sees a stream)
    "v1ChatStream": (v1ChatStream, "/api/chat", True),
    "v1Chat": (v1Chat, "/api/chat", False),
    "v1Embeddings": (v1Embeddings, "/api/embed", False),
    "apiAnalyze": (apiAnalyze, "/api/chat", False),
    "apiAnalyzePdf": (apiAnalyzePdf, "/api/chat", False),
    "apiText": (apiText, "/api/chat", False),
    "apiTextStream": (apiTextStream, "/api/chat", True),
    "apiEmbed": (apiEmbed, "/api/embed", False),
}
EMBED_ROUTES = ("v1Embeddings", "apiEmbed")
WHOLE_UPSTREAM_ROUTES = ("v1Chat", *EMBED_ROUTES)
"""Routes that ask Ollama for one whole answer (stream:false or /api/embed); the others read Ollama's stream."""
PDF_FAULTS = ("down", "busy", "hang", "midstreamError", "restart")


def call(h: Harness, route: str) -> Outcome:
    started = time.monotonic()
    outcome = ROUTES[route][0](h)
    outcome.elapsed = time.monotonic() - started
    return outcome


def matrix(*faults: str) -> list[Any]:
    return [pytest.param(fault, route, id=f"{fault}-{route}") for fault in faults for route in ROUTES
            if route != "apiAnalyzePdf" or fault in PDF_FAULTS]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    directory = tmp_path_factory.mktemp("faults")
    iniPath = directory / "config.ini"
    iniPath.write_text(TEST_INI, encoding="utf-8")
    with StubServer(**KIND_SCHEDULER) as stub:  # many paced streams at once: no OLLAMA_NUM_PARALLEL queueing
        service = ServiceProcess(iniPath, {
            "PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
            "PRIVATE_LLM_OLLAMA__CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
            "PRIVATE_LLM_OLLAMA__READ_TIMEOUT": str(READ_TIMEOUT),
            "PRIVATE_LLM_OLLAMA__MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "PRIVATE_LLM_DOCUMENTS__PRESTART_WORKERS": "true",
            "PRIVATE_LLM_RATELIMIT__API_REQUESTS_PER_MINUTE": "100000", "PRIVATE_LLM_RATELIMIT__API_BURST": "10000",
            "PRIVATE_LLM_RATELIMIT__OPENAI_REQUESTS_PER_MINUTE": "100000",
            "PRIVATE_LLM_RATELIMIT__OPENAI_BURST": "10000"})
        service.start()
        try:
            with (httpx.Client(base_url=service.baseUrl, timeout=READ_TIMEOUT + 20) as http,
                  httpx.Client(base_url=stub.baseUrl, timeout=5) as control,
                  openai.OpenAI(base_url=service.baseUrl + "/v1", api_key=OPENAI_KEY, max_retries=0,
                                timeout=READ_TIMEOUT + 20) as sdk):
                yield Harness(stub, service, http, control, sdk)
        finally:
            service.stop()
        log = service.logText()
        assertNoNetworkViolation(log)
        assert "Traceback" not in log, "the service logged an unexpected exception"


@pytest.fixture
def h(harness: Harness) -> Iterator[Harness]:
    """The harness with a running stub without faults, and a service that sees it."""
    if not harness.stub.running:
        harness.stub.start()
    harness.control.post("/_stub/reset").raise_for_status()
    harness.waitReady()
    yield harness
    if not harness.stub.running:
        harness.stub.start()
    harness.setFault(None)
    deadline = time.monotonic() + MARGIN
    while harness.inFlight() > 1:  # no request is held after its answer
        assert time.monotonic() < deadline, "requests are still in flight after the test"
        time.sleep(0.05)


def assertServesNormally(h: Harness, route: str) -> None:
    h.setFault(None)
    h.waitReady()
    outcome = call(h, route)
    assert (outcome.status, outcome.streamError) == (200, False), outcome
    assert outcome.text, outcome


def assertFailure(outcome: Outcome, status: int, code: str, *messageParts: str, streamError: bool = False) -> None:
    assert (outcome.status, outcome.streamError, outcome.code) == (status, streamError, code), outcome
    for part in messageParts:
        assert part in outcome.message, (part, outcome)
    assert MIDSTREAM_ERROR not in outcome.message, outcome  # Ollama's own text goes to the log only


def assertWireErrorThenDone(h: Harness, code: str) -> None:
    """The /v1 stream on the wire: chunks, then one `data: {"error": ...}` frame, then `data: [DONE]`."""
    with h.http.stream("POST", "/v1/chat/completions", headers=BEARER, json={
            "model": "poweron-text-general", "stream": True,
            "messages": [{"role": "user", "content": "Hello"}]}) as response:
        assert response.status_code == 200
        frames = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]", frames
    error = orjson.loads(frames[-2])["error"]
    assert error["code"] == code and error["type"] and error["message"], error
    assert all("error" not in orjson.loads(frame) for frame in frames[:-2])


def assertClosedUpstream(h: Harness, route: str, fault: str) -> None:
    """The service closed the upstream request it gave up on (the stub saw its client go away)."""
    deadline = time.monotonic() + MARGIN
    while not any(event["fault"] == fault and event["path"] == ROUTES[route][1]
                  for event in h.events("faultClientGone")):
        assert time.monotonic() < deadline, f"the service kept the {fault} upstream request open"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("fault, route", matrix("down"))
def test_ollamaDown(h: Harness, fault: str, route: str) -> None:
    h.stub.stop()
    outcome = call(h, route)
    assertFailure(outcome, 503, "upstream_unavailable", "not reachable")
    assert outcome.retryAfter is not None and int(outcome.retryAfter) > 0
    assert outcome.elapsed < CONNECT_TIMEOUT + MARGIN
    h.stub.start()
    assertServesNormally(h, route)


@pytest.mark.parametrize("fault, route", matrix("restart"))
def test_restartMidLoad(h: Harness, fault: str, route: str) -> None:
    # chat answers take 10 x 100 ms; embeddings wait 1 s for their first byte (both below the read timeout)
    h.control.post("/_stub/config", json={"chunks": 10, "chunkDelayMs": 100, "fault": "slowFirstToken",
                                           "faultDelayMs": 1000, "faultPaths": ["/api/embed"]}).raise_for_status()
    path = ROUTES[route][1]
    before = h.control.get("/_stub/requests", params={"path": path}).json()["count"]
    with ThreadPoolExecutor(RESTART_LOAD) as pool:
        futures = [pool.submit(call, h, route) for _ in range(RESTART_LOAD)]
        _waitForUpstreamRequests(h, path, before + RESTART_LOAD, futures)
        time.sleep(0.6)  # Ollama is working on them (a cut within 0.5 s of sending is a stale connection)
        h.stub.restart(downtime=0.3)
        inFlight = [future.result() for future in futures]
    streamed = ROUTES[route][2]
    for outcome in inFlight:  # cut while Ollama worked on them: a clear 502 (or the stream's error event)
        assertFailure(outcome, 200 if streamed else 502, "upstream_error", "closed the connection unexpectedly",
                      streamError=streamed)
        assert outcome.elapsed < 1.0 + READ_TIMEOUT + MARGIN, outcome
    h.setFault(None, chunkDelayMs=0)
    h.waitReady()
    with ThreadPoolExecutor(MAX_CONNECTIONS) as pool:  # every pooled connection is fresh, none is a dead one
        after = list(pool.map(lambda _: call(h, route), range(2 * MAX_CONNECTIONS)))
    assert all(outcome.status == 200 and not outcome.streamError and outcome.text for outcome in after), after


def _waitForUpstreamRequests(h: Harness, path: str, count: int, futures: list) -> None:
    deadline = time.monotonic() + MARGIN + 2
    while h.control.get("/_stub/requests", params={"path": path}).json()["count"] < count:
        assert time.monotonic() < deadline and not any(f.done() for f in futures), "requests did not reach Ollama"
        time.sleep(0.02)


@pytest.mark.parametrize("fault, route", matrix("busy"))
def test_ollamaBusy(h: Harness, fault: str, route: str) -> None:
    h.setFault("busy")
    outcome = call(h, route)
    assertFailure(outcome, 503, "upstream_busy", "Ollama is busy (server busy)")
    assert BUSY_MESSAGE not in outcome.message  # Ollama's own text goes to the log only
    assert outcome.retryAfter == "2"
    assert outcome.elapsed < MARGIN
    assertServesNormally(h, route)


@pytest.mark.parametrize("fault, route", matrix("hang"))
def test_ollamaHangs(h: Harness, fault: str, route: str) -> None:
    h.setFault("hang")
    outcome = call(h, route)
    assertFailure(outcome, 504, "upstream_timeout", "did not answer in time")
    assert READ_TIMEOUT * 0.9 <= outcome.elapsed < READ_TIMEOUT + MARGIN, outcome
    assertClosedUpstream(h, route, "hang")
    assertServesNormally(h, route)


@pytest.mark.parametrize("fault, route", matrix("slowFirstToken"))
def test_slowFirstTokenWithinTheReadTimeout(h: Harness, fault: str, route: str) -> None:
    h.setFault("slowFirstToken", faultDelayMs=SLOW_BELOW_MS)
    outcome = call(h, route)
    assert (outcome.status, outcome.streamError) == (200, False) and outcome.text, outcome
    assert SLOW_BELOW_MS / 1000 <= outcome.elapsed < SLOW_BELOW_MS / 1000 + MARGIN
    assert h.events("fault"), "the stub did not delay the answer"
    assertServesNormally(h, route)


@pytest.mark.parametrize("fault, route", matrix("slowFirstTokenOverTheReadTimeout"))
def test_slowFirstTokenOverTheReadTimeout(h: Harness, fault: str, route: str) -> None:
    h.setFault("slowFirstToken", faultDelayMs=SLOW_ABOVE_MS)
    outcome = call(h, route)
    assertFailure(outcome, 504, "upstream_timeout", "did not answer in time")
    assert READ_TIMEOUT * 0.9 <= outcome.elapsed < READ_TIMEOUT + MARGIN, outcome
    assertClosedUpstream(h, route, "slowFirstToken")
    assertServesNormally(h, route)


def _expectedBrokenAnswer(fault: str, route: str) -> tuple[str, tuple[str, ...]]:
    """(code, message parts) of the documented error for an answer Ollama broke (see architecture.md)."""
    if fault == "midstreamError":
        if route in WHOLE_UPSTREAM_ROUTES:  # Ollama answers 500 {"error": ...}
            return "upstream_error", ("failed with status 500", "the log tells why")
        return "upstream_stream_error", ("failed while generating",)
    if fault == "truncate":
        return "upstream_error", ("closed the connection unexpectedly",)
    return "upstream_error", ("not JSON",)


@pytest.mark.parametrize("fault, route", matrix("midstreamError", "truncate", "malformedLine"))
def test_brokenAnswer(h: Harness, fault: str, route: str) -> None:
    h.setFault(fault)
    outcome = call(h, route)
    code, parts = _expectedBrokenAnswer(fault, route)
    streamed = ROUTES[route][2]
    assertFailure(outcome, 200 if streamed else 502, code, *parts, streamError=streamed)
    assert outcome.elapsed < MARGIN
    if route == "v1ChatStream":
        assertWireErrorThenDone(h, code)
    assertServesNormally(h, route)


STALL_ROUTES = ("v1ChatStream", "apiTextStream", "apiText", "apiAnalyze")
"""Routes that read Ollama's stream: a stall after the response head is a read timeout in the middle of it."""


@pytest.mark.parametrize("route", STALL_ROUTES, ids=[f"stall-{route}" for route in STALL_ROUTES])
def test_streamStallsAfterItsHead(h: Harness, route: str) -> None:
    h.control.post("/_stub/config", json={"chunks": 2, "chunkDelayMs": SLOW_ABOVE_MS}).raise_for_status()
    outcome = call(h, route)
    # the service starts a client's stream only with Ollama's first line (until then another upstream could take
    # the request), so a stall between the head and the first line is a plain 504 on streamed routes too
    assertFailure(outcome, 504, "upstream_timeout", "did not answer in time")
    assert READ_TIMEOUT * 0.9 <= outcome.elapsed < READ_TIMEOUT + MARGIN, outcome
    deadline = time.monotonic() + MARGIN
    while not h.events("disconnect"):  # the service closed the stalled upstream request
        assert time.monotonic() < deadline, "the service kept the stalled upstream request open"
        time.sleep(0.05)
    h.control.post("/_stub/config", json={"chunkDelayMs": 0}).raise_for_status()
    assertServesNormally(h, route)
