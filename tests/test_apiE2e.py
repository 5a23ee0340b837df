"""End to end: /api/analyze on the real service process (uvicorn, uvloop, render workers from the fork server) in
front of the Ollama stub: good and hostile documents, no content in the logs, no worker left behind."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import API_KEY, childPids
from tests.documentSamples import makeImage, makePdf, makePixelBombPng, makeZipNamedPdf
from tests.ollamaStub import StubServer

pytestmark = pytest.mark.e2e
SECRET_TEXT = "Kontoinhaber Hans Muster 7731"
PROMPT = "Find the account holder [marker-4711]"


def analyze(baseUrl: str, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(baseUrl + "/api/analyze", headers={"X-API-Key": API_KEY}, timeout=60,
                      files={"file": ("upload.pdf", data, "application/pdf")}, data={"prompt": PROMPT, **fields})


def test_realServiceAnalysesDocumentsSurvivesHostileOnesAndLogsNoContent(serviceFactory) -> None:
    with StubServer() as stub:
        service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
                                  "PRIVATE_LLM_DOCUMENTS__PRESTART_WORKERS": "true"})
        first = analyze(service.baseUrl, makePdf(2, text=SECRET_TEXT + " page {page}"))
        assert first.status_code == 200, first.text
        assert first.json()["pagesAnalysed"] == [1, 2] and first.headers["x-request-id"]
        chats = httpx.get(stub.url("/_stub/requests"), params={"path": "/api/chat"}).json()["requests"]
        assert [len(chat["images"]) for chat in chats] == [2]
        assert (analyze(service.baseUrl, makePixelBombPng()).status_code,
                analyze(service.baseUrl, makeZipNamedPdf()).status_code,
                analyze(service.baseUrl, b"").status_code) == (413, 415, 400)
        streamed = analyze(service.baseUrl, makeImage(1600, 1200, "PNG"), stream="true")
        assert streamed.text.splitlines()[-1].startswith('{"type":"done"')
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the model is still answering
            httpx.post(service.baseUrl + "/api/analyze", headers={"X-API-Key": API_KEY}, timeout=0.5,
                       files={"file": ("a.png", makeImage(64, 64), "image/png")}, data={"prompt": "[[slow]]"})
        waitForDisconnectEvent(stub)
        workers = childPids(service.process.pid)
        assert workers, "the render workers run as child processes"
        service.stop()
    log = service.logText()
    assert SECRET_TEXT not in log and "marker-4711" not in log, "logs carry metadata only"
    access = [orjson.loads(line) for line in log.splitlines() if line.startswith("{") and "/api/analyze" in line]
    done = [entry for entry in access if entry["status"] == 200 and not entry["streamed"]][0]
    assert done["model"] == "poweron-vision-general" and done["key"] == "gateway"
    assert done["promptTokens"] > 0 and done["completionTokens"] > 0 and done["upstreamMs"] > 0
    deadline = time.monotonic() + 10  # the fork server and resource tracker notice the parent's exit within ~3 s
    while any(isRunning(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if isRunning(pid)], "no render process outlives the service"


def waitForDisconnectEvent(stub: StubServer, timeout: float = 10.0) -> None:
    """Until the stub saw the service close the chat request (Ollama stops generating then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = httpx.get(stub.url("/_stub/events"), params={"type": "disconnect"}).json()["events"]
        if any(event["path"] == "/api/chat" for event in events):
            return
        time.sleep(0.1)
    raise AssertionError("the service kept the Ollama request open after its client left")


def isRunning(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
