"""Fault matrix for speech to text through the main service: the real service (``python app.py``) forwards
/v1/audio/transcriptions and /v1/audio/translations to tests/whisperStub.py, whose faults are switched while the
service runs; the real ``openai`` SDK (max_retries=0) calls it. Each fault gives the status and message documented
in docu/speech-to-text.md ("Failures") within the configured timeout (+ margin), and the next normal transcription
on the same service process succeeds. Clients that leave during the upload, while whisper works, or mid-stream free
the upstream request, the in-flight gauge and their key's concurrency slot."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from speech import whisperProxy
from tests.conftest import (
    OPENAI_KEY,
    OTHER_OPENAI_KEY,
    OTHER_OPENAI_KEY_NAME,
    TEST_INI,
    ServiceProcess,
    assertNoNetworkViolation,
)
from tests.whisperStub import STREAM_ERROR_MESSAGE, WhisperStub, busyError, stubText
from tests.whisperSupport import WhisperProcess, wavBytes

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")]

REQUEST_TIMEOUT = 1.5
"""[whisper] request_timeout of the service under test: how long it waits for whisper's answer or next event."""
MARGIN = 3.0
AUDIO = b"RIFF" + b"\0" * 32_000
"""Synthetic audio (the stub does not decode it): one second at 16 kHz, 16 bit."""
MODES = ("transcription", "transcriptionStream", "translation")
SERVICE = "The speech-to-text service"
TIMEOUT_MESSAGE = f"{SERVICE} did not answer in time"
CUT_MESSAGE = f"{SERVICE} closed the connection unexpectedly (RemoteProtocolError)"
FAILED_500_MESSAGE = f"{SERVICE} failed with status 500: Internal error; the request id in the logs tells more"
NOT_JSON_ANSWER = f"{SERVICE} sent an answer that is not JSON"
NOT_JSON_EVENT = f"{SERVICE} sent an event that is not JSON"
BOUNDARY = "faultmatrixboundary"


@pytest.fixture(scope="module")
def whisperStub() -> Iterator[WhisperStub]:
    with WhisperStub() as stub:
        yield stub


@pytest.fixture
def whisper(whisperStub: WhisperStub) -> Iterator[WhisperStub]:
    """The module's stub, running, without faults or events; left that way after the test."""
    whisperStub.start().reset()
    yield whisperStub
    whisperStub.start().reset()


def startService(directory: Path, stub: WhisperStub, **extraEnv: str) -> ServiceProcess:
    ini = directory / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    env = {"PRIVATE_LLM_WHISPER__BASE_URL": stub.baseUrl, "PRIVATE_LLM_WHISPER__ENABLED": "true", **extraEnv}
    return ServiceProcess(ini, env).start()


@pytest.fixture(scope="module")
def service(whisperStub: WhisperStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The main service with a short [whisper] request_timeout."""
    process = startService(tmp_path_factory.mktemp("faultWhisper"), whisperStub,
                           PRIVATE_LLM_WHISPER__REQUEST_TIMEOUT=str(REQUEST_TIMEOUT))
    yield process
    process.stop()
    assertNoNetworkViolation(process.logText())


@pytest.fixture(scope="module")
def patientService(whisperStub: WhisperStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The main service waiting a minute for whisper, and one request in flight at most for the second key: what
    frees a departed client's request can only be the disconnect, not a timeout."""
    process = startService(tmp_path_factory.mktemp("disconnectWhisper"), whisperStub,
                           PRIVATE_LLM_WHISPER__REQUEST_TIMEOUT="60",
                           PRIVATE_LLM_RATELIMIT__PER_KEY=f"{OTHER_OPENAI_KEY_NAME}=600/100/1")
    yield process
    process.stop()
    assertNoNetworkViolation(process.logText())


def sdkFor(service: ServiceProcess, key: str = OPENAI_KEY) -> OpenAI:
    return OpenAI(base_url=service.baseUrl + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def sdk(service: ServiceProcess) -> Iterator[OpenAI]:
    with sdkFor(service) as client:
        yield client


def newRequestId() -> str:
    return "fault-" + uuid.uuid4().hex[:12]


def transcribe(sdk: OpenAI, mode: str, requestId: str, seen: list[Any] | None = None) -> str:
    """One call in ``mode``; the text. Stream events go to ``seen`` as they arrive (also when the stream fails)."""
    upload = {"file": ("speech.wav", AUDIO, "audio/wav"), "model": "whisper-1",
              "extra_headers": {"X-Request-ID": requestId}}
    if mode == "translation":
        return sdk.audio.translations.create(**upload).text
    if mode == "transcription":
        return sdk.audio.transcriptions.create(**upload).text
    events = seen if seen is not None else []
    for event in sdk.audio.transcriptions.create(**upload, stream=True):
        events.append(event)
    assert events and events[-1].type == "transcript.text.done", events
    return events[-1].text


def failingCall(sdk: OpenAI, mode: str, seen: list[Any] | None = None) -> tuple[openai.APIError, float, str]:
    """The error a call in ``mode`` raises, the seconds it took, and its request id."""
    requestId = newRequestId()
    started = time.monotonic()
    with pytest.raises(openai.APIError) as failed:
        transcribe(sdk, mode, requestId, seen)
    return failed.value, time.monotonic() - started, requestId


def assertError(error: openai.APIError, status: int | None, code: str, message: str) -> None:
    """OpenAI's envelope with ``code`` and ``message``; ``status`` None for an error event inside a 200 stream."""
    if status is None:
        assert not isinstance(error, openai.APIStatusError), error
    else:
        assert isinstance(error, openai.APIStatusError) and error.status_code == status, error
    assert isinstance(error.body, dict) and error.body.get("code") == code, error.body
    assert error.body.get("message") == message, error.body


def inFlight(service: ServiceProcess) -> float:
    response = httpx.get(service.baseUrl + "/metrics", headers={"Authorization": f"Bearer {OPENAI_KEY}"}, timeout=5)
    response.raise_for_status()
    samples = [sample for family in text_string_to_metric_families(response.text) for sample in family.samples
               if sample.name == "poweron_requests_in_flight"]
    assert len(samples) == 1, samples
    return samples[0].value


def assertNothingInFlight(service: ServiceProcess, timeout: float = 5.0) -> None:
    """Only the scrape itself is in flight, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (count := inFlight(service)) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count == 1, f"{count - 1:g} requests still in flight"


def assertServesNormally(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub, mode: str) -> None:
    """The fault is over: the very next call on the same service process succeeds, and nothing is left over."""
    whisper.clearFault()
    assert transcribe(sdk, mode, newRequestId()) == stubText()
    assertNothingInFlight(service)


def waitUntilServes(sdk: OpenAI, mode: str, timeout: float = 10.0) -> None:
    """After whisper comes back: the service notices (its health probe runs every discovery_ttl) and serves."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert transcribe(sdk, mode, newRequestId()) == stubText()
            return
        except openai.APIStatusError as exc:
            if exc.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def firstDeltaOnly(seen: list[Any]) -> None:
    assert [event.type for event in seen] == ["transcript.text.delta"], seen
    assert seen[0].delta == "Segment 1 of the stub transcript."


# ------------------------------------------------------------------------------------------ the stub itself


def test_stubKeepsWhisperServicesContract(whisper: WhisperStub) -> None:
    files = {"file": ("a.wav", AUDIO, "audio/wav")}
    with httpx.Client(base_url=whisper.baseUrl, timeout=5) as client:
        assert client.get("/health").json()["status"] == "ok"
        answers = {fmt: client.post("/v1/audio/transcriptions", files=files,
                                    data={"model": "whisper-1", "response_format": fmt})
                   for fmt in ("json", "text", "srt", "vtt", "verbose_json")}
        stream = client.post("/v1/audio/translations", files=files, data={"model": "whisper-1", "stream": "true"})
        unknown = client.post("/v1/audio/transcriptions", files=files, data={"model": "gpt-4o-transcribe"})
        srtStream = client.post("/v1/audio/transcriptions", files=files,
                                data={"model": "whisper-1", "response_format": "srt", "stream": "true"})
    assert answers["json"].json() == {"text": stubText(), "usage": {"type": "duration", "seconds": 1.0}}
    assert answers["text"].text == stubText() + "\n"
    assert answers["srt"].text.startswith("1\n00:00:00,000 --> 00:00:00,500\nSegment 1 of the stub transcript.\n")
    assert answers["vtt"].headers["content-type"] == "text/vtt; charset=utf-8"
    assert answers["verbose_json"].json()["segments"][1]["text"] == " Segment 2 of the stub transcript."
    assert all(a.headers["x-poweron-model"] == "poweron-transcribe" for a in answers.values())
    assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert stream.text.split("\n\n")[-2] == (f'data: {{"type":"transcript.text.done","text":"{stubText()}",'
                                              '"language":"english"}')
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert srtStream.status_code == 400 and srtStream.json()["error"]["param"] == "stream"
    assert len(whisper.events("uploaded")) == len(whisper.events("request")) == 8


CONTRACT_CALLS = {
    "json": {"response_format": "json"}, "text": {"response_format": "text"}, "vtt": {"response_format": "vtt"},
    "verbose_json": {"response_format": "verbose_json"}, "stream": {"stream": "true"},
    "unknownModel": {"model": "gpt-4o-transcribe"}, "srtStream": {"response_format": "srt", "stream": "true"},
    "badTemperature": {"temperature": "2"}, "noFile": None,
}


def contractAnswers(baseUrl: str, audio: bytes) -> dict[str, httpx.Response]:
    answers = {}
    with httpx.Client(base_url=baseUrl, timeout=60) as client:
        for name, fields in CONTRACT_CALLS.items():
            files = {"file": ("a.wav", audio, "audio/wav")} if fields is not None else {"other": ("a.txt", b"x")}
            answers[name] = client.post("/v1/audio/transcriptions", files=files,
                                        data={"model": "whisper-1", **(fields or {})})
    return answers


@pytest.mark.stt
def test_stubAnswersLikeTheRealWhisperService(whisper: WhisperStub, tmp_path: Path) -> None:
    silence = wavBytes([0.0] * 16_000)
    real = WhisperProcess(tmp_path).start()
    try:
        expected = contractAnswers(real.baseUrl, silence)
    finally:
        real.stop()
    actual = contractAnswers(whisper.baseUrl, silence)
    for name in CONTRACT_CALLS:
        want, got = expected[name], actual[name]
        assert (got.status_code, got.headers["content-type"]) == (want.status_code, want.headers["content-type"])
        assert got.headers.get("x-poweron-model") == want.headers.get("x-poweron-model"), name
        assert got.headers.get("cache-control") == want.headers.get("cache-control"), name
        if want.status_code != 200:
            assert got.json() == want.json(), name
    assert actual["json"].json().keys() == expected["json"].json().keys()
    assert actual["verbose_json"].json().keys() == expected["verbose_json"].json().keys()
    assert actual["vtt"].text.startswith("WEBVTT\n\n") and expected["vtt"].text.startswith("WEBVTT\n\n")
    assert actual["stream"].text.split("\n\n")[-2].startswith('data: {"type":"transcript.text.done","text":')
    assert expected["stream"].text.split("\n\n")[-2].startswith('data: {"type":"transcript.text.done","text":')


# ------------------------------------------------------------------------------------------ fault matrix


@pytest.mark.parametrize("mode", MODES)
def test_whisperDown(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub, mode: str) -> None:
    whisper.stop()
    error, seconds, _ = failingCall(sdk, mode)
    assertError(error, 503, "upstream_unavailable", f"{SERVICE} is not reachable")
    assert int(error.response.headers["retry-after"]) > 0
    assert seconds < MARGIN
    whisper.start()
    waitUntilServes(sdk, mode)
    assertServesNormally(sdk, service, whisper, mode)


def test_whisperRestartMidLoad(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub) -> None:
    whisper.configure(fault="slowFirstToken", faultDelayMs=1000)
    outcomes: list[Any] = []

    def call(mode: str) -> None:
        try:
            outcomes.append(transcribe(sdk, mode, newRequestId()))
        except openai.APIError as exc:
            outcomes.append(exc)

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        for mode in MODES * 2:
            pool.submit(call, mode)
        deadline = time.monotonic() + 5
        while len(whisper.events("uploaded")) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        whisper.restart(downtime=0.5)
    assert time.monotonic() - started < REQUEST_TIMEOUT + MARGIN + 1
    errors = [o for o in outcomes if isinstance(o, openai.APIError)]
    cut = [e for e in errors if isinstance(e, openai.APIStatusError) and e.status_code == 502]
    assert len(outcomes) == 6 and cut, outcomes
    for error in cut:
        assertError(error, 502, "upstream_error", CUT_MESSAGE)
    for error in (e for e in errors if e not in cut):  # came in while whisper was down (only on a slow machine)
        assertError(error, 503, "upstream_unavailable", f"{SERVICE} is not reachable")
    assert all(o == stubText() for o in outcomes if not isinstance(o, openai.APIError))
    for mode in MODES:
        waitUntilServes(sdk, mode)
    assertServesNormally(sdk, service, whisper, "transcription")


@pytest.mark.parametrize("mode", MODES)
def test_whisperBusy(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub, mode: str) -> None:
    whisper.configure(fault="busy")
    error, seconds, requestId = failingCall(sdk, mode)
    busy = busyError()
    assertError(error, 503, busy.code, busy.message)
    assert error.response.headers["retry-after"] == "5"
    assert seconds < MARGIN
    assert whisper.events("fault", requestId)[0]["fault"] == "busy"
    assertServesNormally(sdk, service, whisper, mode)


@pytest.mark.parametrize("mode", MODES)
def test_whisperHangs(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub, mode: str) -> None:
    whisper.configure(fault="hang")
    error, seconds, requestId = failingCall(sdk, mode)
    assertError(error, 504, "upstream_timeout", TIMEOUT_MESSAGE)
    assert seconds < REQUEST_TIMEOUT + MARGIN
    assert whisper.waitForEvent("clientGone", requestId, timeout=MARGIN)["phase"] == "waiting"
    assertServesNormally(sdk, service, whisper, mode)


@pytest.mark.parametrize("mode", MODES)
def test_slowFirstTokenWithinTheTimeout(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub,
                                        mode: str) -> None:
    whisper.configure(fault="slowFirstToken", faultDelayMs=REQUEST_TIMEOUT * 1000 / 3)
    started = time.monotonic()
    assert transcribe(sdk, mode, newRequestId()) == stubText()
    assert time.monotonic() - started < REQUEST_TIMEOUT + MARGIN
    assert len(whisper.events("fault")) == 1
    assertServesNormally(sdk, service, whisper, mode)


@pytest.mark.parametrize("mode", MODES)
def test_slowFirstTokenOverTheTimeout(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub, mode: str) -> None:
    whisper.configure(fault="slowFirstToken", faultDelayMs=REQUEST_TIMEOUT * 1000 * 4)
    error, seconds, requestId = failingCall(sdk, mode)
    assertError(error, 504, "upstream_timeout", TIMEOUT_MESSAGE)
    assert seconds < REQUEST_TIMEOUT + MARGIN
    assert whisper.waitForEvent("clientGone", requestId, timeout=MARGIN)["phase"] == "waiting"
    assertServesNormally(sdk, service, whisper, mode)


def test_streamStalledAfterItsFirstEventEndsWithAnErrorEvent(sdk: OpenAI, service: ServiceProcess,
                                                            whisper: WhisperStub) -> None:
    whisper.configure(eventDelayMs=REQUEST_TIMEOUT * 1000 * 4)
    seen: list[Any] = []
    error, seconds, requestId = failingCall(sdk, "transcriptionStream", seen)
    assertError(error, None, "upstream_timeout", TIMEOUT_MESSAGE)
    firstDeltaOnly(seen)
    assert seconds < REQUEST_TIMEOUT + MARGIN
    assert whisper.waitForEvent("clientGone", requestId, timeout=MARGIN)["phase"] == "stream"
    whisper.configure(eventDelayMs=0)
    assertServesNormally(sdk, service, whisper, "transcriptionStream")


BROKEN_ANSWERS = {
    # fault: (stream error code, stream message, whole-answer status, code, message)
    "midstreamError": ("stt_failed", STREAM_ERROR_MESSAGE, 502, "upstream_error", FAILED_500_MESSAGE),
    "truncate": ("upstream_error", CUT_MESSAGE, 502, "upstream_error", CUT_MESSAGE),
    "malformedLine": ("upstream_error", NOT_JSON_EVENT, 502, "upstream_error", NOT_JSON_ANSWER),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", list(BROKEN_ANSWERS))
def test_brokenAnswer(sdk: OpenAI, service: ServiceProcess, whisper: WhisperStub, fault: str, mode: str) -> None:
    """An error mid-stream, a cut answer, a line that is not JSON: an error event after the first delta in a
    stream, otherwise the documented 502."""
    streamCode, streamMessage, status, code, message = BROKEN_ANSWERS[fault]
    whisper.configure(fault=fault)
    seen: list[Any] = []
    error, seconds, _ = failingCall(sdk, mode, seen)
    if mode == "transcriptionStream":
        assertError(error, None, streamCode, streamMessage)
        firstDeltaOnly(seen)
    else:
        assertError(error, status, code, message)
    assert seconds < MARGIN
    assertServesNormally(sdk, service, whisper, mode)


# ------------------------------------------------------------------------------------------ client disconnects


def multipartStart(requestId: str) -> bytes:
    return (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {OTHER_OPENAI_KEY}\r\nX-Request-ID: {requestId}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def formParts(streamed: bool) -> bytes:
    fields = b"".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
                      for name, value in (("model", "whisper-1"), ("stream", str(streamed).lower())))
    return fields + (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                     "Content-Type: audio/wav\r\n\r\n").encode()


def assertEverythingFreed(service: ServiceProcess, whisper: WhisperStub) -> None:
    """No request left in flight, and the second key (one request at a time) is admitted again."""
    assertNothingInFlight(service)
    whisper.reset()
    with sdkFor(service, OTHER_OPENAI_KEY) as other:
        assert transcribe(other, "transcription", newRequestId()) == stubText()


def test_clientGoneMidUploadClosesTheUpstreamRequest(patientService: ServiceProcess, whisper: WhisperStub) -> None:
    requestId = newRequestId()
    with socket.create_connection(("127.0.0.1", patientService.port), timeout=5) as client:
        client.sendall(multipartStart(requestId) + chunk(formParts(False) + AUDIO[:16_000]))
        whisper.waitForEvent("request", requestId, timeout=MARGIN)  # whisper receives the upload as it comes
    gone = whisper.waitForEvent("clientGone", requestId, timeout=MARGIN)
    assert gone["phase"] == "upload" and gone["bytes"] > 0
    assert not whisper.events("uploaded", requestId)
    assertEverythingFreed(patientService, whisper)


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
def test_clientGoneWhileWhisperWorksClosesTheUpstreamRequest(patientService: ServiceProcess, whisper: WhisperStub,
                                                             streamed: bool) -> None:
    whisper.configure(fault="hang")
    requestId = newRequestId()
    with socket.create_connection(("127.0.0.1", patientService.port), timeout=5) as client:
        client.sendall(multipartStart(requestId) + chunk(formParts(streamed) + AUDIO)
                       + chunk(f"\r\n--{BOUNDARY}--\r\n".encode()) + b"0\r\n\r\n")
        whisper.waitForEvent("uploaded", requestId, timeout=MARGIN)
    gone = whisper.waitForEvent("clientGone", requestId, timeout=MARGIN)  # not the 60 s request_timeout
    assert gone["phase"] == "waiting"
    assertEverythingFreed(patientService, whisper)


def test_clientGoneMidStreamClosesTheUpstreamRequest(patientService: ServiceProcess, whisper: WhisperStub) -> None:
    whisper.configure(segments=3, eventDelayMs=60_000)
    requestId = newRequestId()
    headers = {"Authorization": f"Bearer {OTHER_OPENAI_KEY}", "X-Request-ID": requestId}
    with httpx.Client(base_url=patientService.baseUrl, timeout=10) as client:
        with client.stream("POST", "/v1/audio/transcriptions", headers=headers, files={"file": ("a.wav", AUDIO)},
                           data={"model": "whisper-1", "stream": "true"}) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert "Segment 1 of the stub transcript." in first
    gone = whisper.waitForEvent("clientGone", requestId, timeout=MARGIN)  # not the 60 s of the next event
    assert gone["phase"] == "stream"
    assertEverythingFreed(patientService, whisper)


# ------------------------------------------------------------------------------------------ event relay (in-process)


async def relayed(chunks: list[bytes]) -> list[bytes]:
    """What whisperProxy.relayEvents sends for an upstream stream arriving in ``chunks``."""

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for data in chunks:
                yield data

    response = httpx.Response(200, stream=Chunks(), headers={"content-type": "text/event-stream"})
    return [event async for event in whisperProxy.relayEvents(response, "http://whisper", None, time.perf_counter())]


DELTA = b'data: {"type":"transcript.text.delta","delta":"Hello there"}\n\n'
DONE = b'data: {"type":"transcript.text.done","text":"Hello there"}\n\n'


async def test_eventsSplitAcrossChunksArePassedWhole() -> None:
    upstream = DELTA + DONE
    assert await relayed([upstream[:20], upstream[20:70], upstream[70:]]) == [DELTA, DONE]
    assert await relayed([upstream.replace(b"\n", b"\r\n")]) == [DELTA, DONE]


async def test_streamEndingWithoutItsDoneEventEndsWithAnErrorEvent() -> None:
    sent = await relayed([DELTA, DELTA[:30]])
    assert sent[0] == DELTA and len(sent) == 2
    error = orjson.loads(sent[1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_stream_error" and error["message"] == whisperProxy.TRUNCATED_STREAM_MESSAGE
