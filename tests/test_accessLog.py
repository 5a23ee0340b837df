"""The access log: one JSON line per request with metadata only; a full request cycle through the real service
(debug logging on) leaves no prompt, file byte, embedding or key in the log."""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import uuid

import httpx
import openai
import orjson
import pytest
from PIL import Image, PngImagePlugin

from app import createApp
from core.requestContext import RequestMeta
from observe.accessLog import ACCESS_LOGGER, NonBlockingStreamHandler, accessRecord, configureLogging, logAccess
from tests.conftest import API_KEY, OPENAI_KEY, waitForHttp
from tests.ollamaStub import StubServer

ACCESS_FIELDS = {"ts", "requestId", "method", "route", "path", "key", "keyClass", "model", "upstream", "failedOver",
                 "status", "durationMs", "upstreamMs", "ttftMs", "queueMs", "promptTokens", "completionTokens",
                 "streamed", "rateLimited", "error"}


def test_accessRecordHoldsMetadataOnly() -> None:
    meta = RequestMeta(requestId="r1", method="POST", path="/v1/chat/completions", keyName="cursor",
                       keyClass="openai", externalModel="poweron-text-general", status=200, upstreamSeconds=0.25,
                       ttftSeconds=0.05, promptTokens=12, completionTokens=30, streamed=True, durationSeconds=0.3)
    meta.route = "/v1/chat/completions"
    record = accessRecord(meta)
    assert set(record) == ACCESS_FIELDS
    assert {k: record[k] for k in ("requestId", "key", "model", "status", "durationMs", "upstreamMs", "ttftMs",
                                   "promptTokens", "completionTokens", "streamed")} == {
        "requestId": "r1", "key": "cursor", "model": "poweron-text-general", "status": 200, "durationMs": 300.0,
        "upstreamMs": 250.0, "ttftMs": 50.0, "promptTokens": 12, "completionTokens": 30, "streamed": True}


def test_logAccessWritesOneJsonLine(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    logAccess(RequestMeta(requestId="abc", method="GET", path="/v1/models", status=401, errorCode="missing_api_key"))
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 1
    assert orjson.loads(lines[0])["error"] == "missing_api_key"


def test_noisyLibrariesAreHeldAtWarning() -> None:
    names = ("", "httpx", "httpcore")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        configureLogging("debug")
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("httpcore").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.DEBUG)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


async def test_everyRequestGetsOneLineWithItsRequestId(makeSettings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    app = createApp(makeSettings(ratelimit={"openai_burst": 1}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver") as client:
        responses = [await client.get("/v1/models", headers={"Authorization": f"Bearer {OPENAI_KEY}"}),
                     await client.get("/v1/models", headers={"Authorization": f"Bearer {OPENAI_KEY}"}),
                     await client.get("/v1/models"),
                     await client.get("/health", headers={"X-Request-ID": "my-own-id-1"})]
    records = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [r["requestId"] for r in records] == [r.headers["x-request-id"] for r in responses]
    assert records[-1]["requestId"] == "my-own-id-1"
    assert [(r["status"], r["key"], r["rateLimited"]) for r in records] == [
        (200, "cursor", False), (429, "cursor", True), (401, None, False), (200, None, False)]
    assert records[0]["route"] == "/v1/models" and records[0]["durationMs"] > 0
    assert records[2]["route"] == "/v1/models"  # refused by the key gate before routing, still attributed


async def test_requestsRefusedBeforeRoutingNameTheirRoute(makeSettings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    app = createApp(makeSettings(limits={"max_body_bytes": 2048}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver") as client:
        tooBig = await client.post("/v1/chat/completions", content=b"x" * 4096,
                                   headers={"Authorization": f"Bearer {OPENAI_KEY}"})
        noKey = await client.get("/v1/models/poweron-embed")
        nowhere = await client.get("/v1/no-such-route", headers={"Authorization": f"Bearer {OPENAI_KEY}"})
    records = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
    assert (tooBig.status_code, noKey.status_code, nowhere.status_code) == (413, 401, 404)
    assert [r["route"] for r in records] == ["/v1/chat/completions", "/v1/models/{modelId}", None]


# --- the full cycle through the real service ----------------------------------------------------------------------

def _pngWithText(marker: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", marker)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _waitForModels(baseUrl: str) -> None:
    waitForHttp(baseUrl + "/health/readiness")
    for _ in range(200):
        names = httpx.get(baseUrl + "/health", headers={"X-API-Key": API_KEY}).json()["models"]["names"]
        if "poweron-text-general" in names and "poweron-vision-general" in names:
            return
        __import__("time").sleep(0.05)
    raise AssertionError("models were not discovered")


def _accessLines(logText: str) -> dict[str, dict]:
    lines = {}
    for line in logText.splitlines():
        if line.startswith("{") and '"requestId"' in line:
            record = orjson.loads(line)
            assert record["requestId"] not in lines, "two access lines for one request"
            lines[record["requestId"]] = record
    return lines


@pytest.mark.e2e
def test_fullRequestCycleLogsNoPromptFileEmbeddingOrKey(serviceFactory) -> None:
    prompt, fileMarker, wrongKey = (f"{kind}-{uuid.uuid4().hex}" for kind in ("PROMPT", "FILEBYTES", "WRONGKEY"))
    document = _pngWithText(fileMarker)
    ids = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in
           ("chat", "stream", "embed", "analyze", "text", "wrongKey", "invalid")}
    with StubServer() as stub:
        service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
                                  "PRIVATE_LLM_SERVER__LOG_LEVEL": "debug"})
        _waitForModels(service.baseUrl)
        sdk = openai.OpenAI(api_key=OPENAI_KEY, base_url=service.baseUrl + "/v1", max_retries=0)
        sdk.chat.completions.create(model="poweron-text-general", messages=[{"role": "user", "content": prompt}],
                                    extra_headers={"X-Request-ID": ids["chat"]})
        list(sdk.chat.completions.create(model="poweron-text-general", stream=True,
                                         messages=[{"role": "user", "content": prompt}],
                                         extra_headers={"X-Request-ID": ids["stream"]}))
        vector = sdk.embeddings.create(model="poweron-embed", input=prompt,
                                       extra_headers={"X-Request-ID": ids["embed"]}).data[0].embedding
        api = httpx.Client(base_url=service.baseUrl, headers={"X-API-Key": API_KEY}, timeout=60)
        analyzed = api.post("/api/analyze", files={"file": ("scan.png", document, "image/png")},
                            data={"model": "poweron-vision-general", "prompt": prompt},
                            headers={"X-Request-ID": ids["analyze"]})
        texted = api.post("/api/text", json={"model": "poweron-text-general", "text": prompt, "prompt": prompt},
                          headers={"X-Request-ID": ids["text"]})
        refused = httpx.get(service.baseUrl + "/v1/models", headers={"Authorization": f"Bearer {wrongKey}",
                                                                     "X-Request-ID": ids["wrongKey"]})
        invalid = httpx.post(service.baseUrl + "/v1/chat/completions",
                             json={"model": "poweron-text-general", "messages": prompt},
                             headers={"Authorization": f"Bearer {OPENAI_KEY}", "X-Request-ID": ids["invalid"]})
        service.stop()
    assert analyzed.status_code == 200, analyzed.text
    assert texted.status_code == 200, texted.text
    assert (refused.status_code, invalid.status_code) == (401, 400)
    log = service.logText()
    secrets = {"prompt": prompt, "file marker": fileMarker, "analysis key": API_KEY, "OpenAI key": OPENAI_KEY,
               "wrong key": wrongKey, "file bytes (base64)": base64.b64encode(document)[:40].decode()}
    secrets.update({f"embedding value {i}": repr(v)[:10] for i, v in enumerate(vector[:3]) if len(repr(v)) >= 10})
    leaked = [name for name, text in secrets.items() if text in log]
    assert not leaked, f"the log contains: {leaked}"
    lines = _accessLines(log)
    assert set(ids.values()) <= set(lines)
    chat, stream = lines[ids["chat"]], lines[ids["stream"]]
    assert (chat["key"], chat["model"], chat["status"], chat["route"]) == (
        "cursor", "poweron-text-general", 200, "/v1/chat/completions")
    assert chat["promptTokens"] > 0 and chat["completionTokens"] > 0 and chat["upstreamMs"] > 0
    assert stream["streamed"] is True and stream["status"] == 200
    assert lines[ids["analyze"]]["key"] == "gateway" and lines[ids["analyze"]]["model"] == "poweron-vision-general"
    assert lines[ids["wrongKey"]]["status"] == 401 and lines[ids["wrongKey"]]["key"] is None
    assert "HTTP/1.1\" 200" not in log, "uvicorn's own access log is on"


def test_aStderrNobodyReadsDropsLinesInsteadOfBlockingTheLoop() -> None:
    """A pipe whose reader stopped (a stalled journald): the handler drops and counts lines instead of blocking in
    write(); once the pipe is read again the next line says how many were dropped."""
    readEnd, writeEnd = os.pipe()
    stream = os.fdopen(writeEnd, "w")
    handler = NonBlockingStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    stalled = logging.getLogger("poweron.test.stalledPipe")
    stalled.propagate, stalled.handlers = False, [handler]
    stalled.setLevel(logging.INFO)
    line = "x" * 400
    caller = threading.Thread(target=lambda: [stalled.info(line) for _ in range(1000)])  # ~400 KB > the pipe's 64 KiB
    caller.start()
    caller.join(20)  # a blocking handler would hang here for good
    try:
        assert not caller.is_alive()
        dropped = handler.dropped
        assert dropped > 0
        os.set_blocking(readEnd, False)
        while True:  # the reader catches up
            try:
                os.read(readEnd, 1 << 16)
            except BlockingIOError:
                break
        stalled.info("after")
        os.set_blocking(readEnd, True)
        written = os.read(readEnd, 1 << 16).decode().splitlines()
        assert written == [f"{dropped} log lines dropped: the log's reader was not reading", "after"]
        assert handler.dropped == 0
    finally:
        stalled.handlers = []
        stream.close()
        os.close(readEnd)


def test_configureLogging_usesTheNonBlockingHandlerWhenTheRootHasNone() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    stream = io.StringIO()
    try:
        configureLogging("info", stream)
        assert [type(handler) for handler in root.handlers] == [NonBlockingStreamHandler]
        logging.getLogger(ACCESS_LOGGER).info('{"requestId": "x1"}')
    finally:
        root.handlers, root.level = saved, level
    assert stream.getvalue() == '{"requestId": "x1"}\n'
