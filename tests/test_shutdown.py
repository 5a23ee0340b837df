"""Graceful shutdown of the real process: on SIGTERM new connections are refused, a running stream finishes (up to
[server] graceful_shutdown_seconds), then the process exits."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.conftest import OPENAI_KEY
from tests.ollamaStub import StubServer

pytestmark = pytest.mark.e2e
WAIT_SECONDS = 30.0
CHUNKS = 16
CLEAN_EXIT_CODES = (0, -signal.SIGTERM)  # uvicorn re-raises the captured SIGTERM after a clean shutdown
CHAT = {"model": "poweron-text-general", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def slowStub() -> Iterator[StubServer]:
    """Every reply streams CHUNKS chunks, 250 ms apart: a stream that is still running when SIGTERM arrives."""
    server = StubServer(models=["qwen2.5:7b"], chunks=CHUNKS, chunkDelayMs=250).start()
    yield server
    server.stop()


def refusesConnections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except OSError:
        return True


def waitUntil(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sseData(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def openStream(client: httpx.Client, baseUrl: str) -> tuple[httpx.Response, Iterator[str]]:
    request = client.build_request("POST", baseUrl + "/v1/chat/completions", json=CHAT,
                                   headers={"Authorization": f"Bearer {OPENAI_KEY}"})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    return response, response.iter_lines()


def test_runningStreamFinishesAfterSigtermWhileNewConnectionsAreRefused(slowStub, serviceFactory):
    service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": slowStub.baseUrl,
                              "PRIVATE_LLM_SERVER__GRACEFUL_SHUTDOWN_SECONDS": "60"})
    waitUntil(lambda: httpx.get(service.baseUrl + "/health/readiness").status_code == 200, "readiness")
    with httpx.Client(timeout=WAIT_SECONDS) as client:
        response, lines = openStream(client, service.baseUrl)
        received = [next(lines)]  # the role frame: the stream is running
        service.process.send_signal(signal.SIGTERM)
        waitUntil(lambda: refusesConnections(service.port), "the listening socket to close")
        assert service.process.poll() is None  # still serving the stream
        received += list(lines)
        response.close()
    frames = sseData(received)
    assert frames[-1] == "[DONE]"
    chunks = [orjson.loads(frame) for frame in frames[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text.startswith("This is a deterministic reply from the Ollama stub")
    assert service.process.wait(WAIT_SECONDS) in CLEAN_EXIT_CODES
    assert "Application shutdown complete" in service.logText()  # the lifespan closed its clients


def test_streamIsCutWhenTheGracePeriodEnds(slowStub, serviceFactory):
    httpx.post(slowStub.url("/_stub/config"), json={"chunks": 400})  # 100 s of stream, far beyond the grace period
    service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": slowStub.baseUrl,
                              "PRIVATE_LLM_SERVER__GRACEFUL_SHUTDOWN_SECONDS": "1"})
    waitUntil(lambda: httpx.get(service.baseUrl + "/health/readiness").status_code == 200, "readiness")
    with httpx.Client(timeout=WAIT_SECONDS) as client:
        response, lines = openStream(client, service.baseUrl)
        received = [next(lines)]
        service.process.send_signal(signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):  # the server closes the connection mid-stream
            received += list(lines)
        response.close()
    assert "[DONE]" not in sseData(received)
    try:
        service.process.wait(WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after the grace period")
