"""End to end: the real service process over TCP, the Ollama stub, the `openai` SDK as clients use it.

Shows that SSE frames are flushed as Ollama produces them, that a client going away closes the upstream request at
once (streaming and not), and that F13's call shape works unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from tests.conftest import OPENAI_KEY, TEST_INI, ServiceProcess
from tests.ollamaStub import MIDSTREAM_ERROR, REPLY_TEMPLATE, StubServer

pytestmark = pytest.mark.e2e
TEXT = "poweron-text-general"
SLOW = [{"role": "user", "content": "Langsam bitte [[slow]]"}]  # the stub waits 0.2 s before each chunk
DISCONNECT_DEADLINE_SECONDS = 1.0


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture(scope="module")
def service(stub: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    ini = tmp_path_factory.mktemp("openai-e2e") / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    with ServiceProcess(ini, {"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl}) as process:
        waitUntilModelsListed(process)
        yield process


def waitUntilModelsListed(process: ServiceProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(process.baseUrl + "/v1/models", headers={"Authorization": f"Bearer {OPENAI_KEY}"})
        if response.status_code == 200 and response.json()["data"]:
            return
        time.sleep(0.1)
    raise TimeoutError("the service never listed the stub's models")


@pytest.fixture
def stubControl(stub: StubServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stub.baseUrl, timeout=5.0) as control:
        control.post("/_stub/reset").raise_for_status()
        yield control


def sdk(service: ServiceProcess, **options) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=service.baseUrl + "/v1", api_key=OPENAI_KEY, **options)


async def disconnectEventAfter(stubControl: httpx.Client, since: float) -> float:
    """Seconds from ``since`` until the stub saw the upstream connection close (fails after 3 s)."""
    for _ in range(60):
        events = stubControl.get("/_stub/events", params={"type": "disconnect"}).json()["events"]
        if events:
            return events[0]["at"] - since
        await asyncio.sleep(0.05)
    pytest.fail("the stub never saw the upstream connection close")


async def test_sse_headers_and_frames_on_the_wire(service: ServiceProcess, stubControl: httpx.Client) -> None:
    body = {"model": TEXT, "messages": [{"role": "user", "content": "Hallo"}], "stream": True,
            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=service.baseUrl, headers={"Authorization": f"Bearer {OPENAI_KEY}"}) as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""] and all(frame.startswith("data: ") for frame in frames[:-1])
    payloads = [orjson.loads(frame[6:]) for frame in frames[:-2]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["prompt_tokens"] == 1


async def test_frames_are_flushed_as_ollama_produces_them(service: ServiceProcess, stubControl) -> None:
    async with sdk(service, max_retries=0) as client:
        stream = await client.chat.completions.create(model=TEXT, messages=SLOW, stream=True)
        arrivals = [(time.monotonic(), chunk) async for chunk in stream]
    contentTimes = [at for at, chunk in arrivals if chunk.choices and chunk.choices[0].delta.content]
    assert len(contentTimes) >= 6
    # 8 chunks paced 0.2 s apart upstream: if anything buffered, they would arrive together at the end
    assert contentTimes[-1] - contentTimes[0] >= 0.8


async def test_client_disconnect_mid_stream_closes_upstream(service: ServiceProcess, stubControl) -> None:
    async with sdk(service, max_retries=0) as client:
        stream = await client.chat.completions.create(model=TEXT, messages=SLOW, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        closedAt = time.monotonic()
        await stream.close()
        assert await disconnectEventAfter(stubControl, closedAt) < DISCONNECT_DEADLINE_SECONDS


async def test_client_giving_up_on_a_non_streaming_answer_closes_upstream(service: ServiceProcess,
                                                                          stubControl) -> None:
    async with sdk(service, max_retries=0, timeout=0.5) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model=TEXT, messages=SLOW)
        gaveUpAt = time.monotonic()
    assert await disconnectEventAfter(stubControl, gaveUpAt) < DISCONNECT_DEADLINE_SECONDS


async def test_f13_call_shape_works_unchanged(service: ServiceProcess, stubControl: httpx.Client) -> None:
    client = AsyncOpenAI(base_url=service.baseUrl + "/v1", api_key=OPENAI_KEY, timeout=60, max_retries=3)
    async with client:
        messages = [{"role": "system", "content": "Du fasst Bescheide zusammen."},
                    {"role": "user", "content": "Fasse zusammen"}]
        answer = await client.chat.completions.create(model=TEXT, messages=messages, temperature=0.3,
                                                      max_tokens=512)
        stream = await client.chat.completions.create(model=TEXT, messages=messages, temperature=0.3,
                                                      max_tokens=512, stream=True)
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert answer.choices[0].message.content == REPLY_TEMPLATE.format(prompt="Fasse zusammen") == streamed
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0
    options = [entry["body"]["options"] for entry in
               stubControl.get("/_stub/requests", params={"path": "/api/chat"}).json()["requests"]]
    assert options == [{"num_ctx": 8192, "temperature": 0.3, "num_predict": 512}] * 2


async def test_midstream_error_is_an_error_frame_then_done(service: ServiceProcess, stubControl) -> None:
    body = {"model": TEXT, "stream": True, "messages": [{"role": "user", "content": "[[midstream-error]]"}]}
    async with httpx.AsyncClient(base_url=service.baseUrl, headers={"Authorization": f"Bearer {OPENAI_KEY}"}) as http:
        response = await http.post("/v1/chat/completions", json=body)
    frames = response.text.split("\n\n")
    assert response.status_code == 200 and frames[-2:] == ["data: [DONE]", ""]
    error = orjson.loads(frames[-3][6:])["error"]
    assert MIDSTREAM_ERROR not in error["message"] and error["code"] == "upstream_stream_error"
    async with sdk(service, max_retries=0) as client:
        stream = await client.chat.completions.create(**body)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


async def test_abandoned_request_is_logged_as_499_without_content(service: ServiceProcess, stubControl) -> None:
    async with sdk(service, max_retries=0, timeout=0.5) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model=TEXT, messages=[{"role": "user", "content": "Geheim [[slow]]"}])
    for _ in range(40):
        lines = [orjson.loads(line) for line in service.logText().splitlines() if '"status":499' in line]
        if lines:
            break
        await asyncio.sleep(0.05)
    assert lines and lines[-1]["error"] == "client_disconnected" and lines[-1]["model"] == TEXT
    assert "Geheim" not in service.logText()
