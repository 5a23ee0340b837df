"""/v1/audio on the main service (in-process) through the real `openai` SDK: forwarded to the real whisper service
(tiny.en, a process) or to a scripted upstream for the failure paths; keys, availability, limits, pass-through."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import OPENAI_KEY
from tests.whisperSupport import (
    FAKE_PDF,
    MAX_WORD_ERROR_RATE,
    SHORT_TEXT,
    Service,
    WhisperProcess,
    openService,
    parseCues,
    parseSse,
    speak,
    wordErrorRate,
)

DEAD_WHISPER_URL = "http://127.0.0.1:9"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


@pytest.fixture(scope="module")
def workDir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("whisperProxy")


@pytest.fixture(scope="module")
def shortSpeech(workDir: Path) -> bytes:
    return speak(SHORT_TEXT, workDir / "short.wav").read_bytes()


@pytest.fixture(scope="module")
def whisper(workDir: Path) -> Iterator[WhisperProcess]:
    service = WhisperProcess(workDir).start()
    yield service
    service.stop()


@pytest.fixture
async def service(whisper: WhisperProcess, makeSettings) -> AsyncIterator[Service]:
    """The main service with the real whisper service beside it."""
    async with openService(makeSettings(whisper={"base_url": whisper.baseUrl, "enabled": True})) as opened:
        yield opened


@pytest.mark.stt
async def test_sdkTranscribesThroughTheMainService(service: Service, shortSpeech: bytes) -> None:
    result = await service.sdk.audio.transcriptions.create(file=("speech.wav", shortSpeech, "audio/wav"),
                                                           model="whisper-1")
    assert wordErrorRate(SHORT_TEXT, result.text) < MAX_WORD_ERROR_RATE, result.text
    meta = service.metas[-1]
    assert meta.status == 200 and meta.externalModel == "poweron-transcribe" and meta.keyName == "cursor"
    assert meta.upstreamSeconds is not None and not meta.streamed


@pytest.mark.stt
async def test_sdkVerboseJsonWithWordsAndSubtitles(service: Service, shortSpeech: bytes) -> None:
    verbose = await service.sdk.audio.transcriptions.create(
        file=("speech.wav", shortSpeech), model="poweron-transcribe", response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    assert verbose.language == "english" and verbose.segments and verbose.words
    assert [s.start for s in verbose.segments] == sorted(s.start for s in verbose.segments)
    assert wordErrorRate(SHORT_TEXT, " ".join(w.word for w in verbose.words)) < MAX_WORD_ERROR_RATE
    srt = await service.sdk.audio.transcriptions.create(file=("speech.wav", shortSpeech), model="whisper-1",
                                                        response_format="srt")
    assert isinstance(srt, str)
    assert wordErrorRate(SHORT_TEXT, " ".join(text for _, _, text in parseCues(srt))) < MAX_WORD_ERROR_RATE


@pytest.mark.stt
async def test_sdkStreamPassesTheEventsThrough(service: Service, shortSpeech: bytes) -> None:
    stream = await service.sdk.audio.transcriptions.create(file=("speech.wav", shortSpeech), model="whisper-1",
                                                           stream=True)
    events = [event async for event in stream]
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert deltas and events[-1].type == "transcript.text.done"
    assert events[-1].text == "".join(deltas).strip()
    assert wordErrorRate(SHORT_TEXT, events[-1].text) < MAX_WORD_ERROR_RATE
    assert service.metas[-1].streamed is True


@pytest.mark.stt
async def test_whisperErrorsReachTheClientUnchanged(service: Service) -> None:
    with pytest.raises(openai.APIStatusError) as notAudio:
        await service.sdk.audio.transcriptions.create(file=("invoice.mp3", FAKE_PDF), model="whisper-1")
    assert notAudio.value.status_code == 415 and "could not be decoded as audio" in notAudio.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        await service.sdk.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="gpt-4o-transcribe")
    assert unknown.value.body["param"] == "model"


@pytest.mark.stt
async def test_transcribeIsListedWhileWhisperAnswers(service: Service) -> None:
    names = [model.id async for model in service.sdk.models.list()]
    assert "poweron-transcribe" in names and "whisper-1" not in names


@pytest.mark.stt
async def test_anEnglishOnlyModelRefusesGermanWithAClear400(service: Service, shortSpeech: bytes) -> None:
    """tiny.en would answer German speech with English words: language=de is refused before any work."""
    with pytest.raises(openai.BadRequestError) as refused:
        await service.sdk.audio.transcriptions.create(file=("speech.wav", shortSpeech), model="whisper-1",
                                                      language="de")
    error = refused.value.body
    assert error["code"] == "unsupported_language" and error["param"] == "language"
    assert error["message"] == ("language 'de' (german) cannot be transcribed: the speech-to-text model is "
                                "English-only; send English audio, or leave language empty")
    assert service.metas[-1].status == 400


@pytest.mark.stt
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # openai-python flags audio.translations
async def test_anEnglishOnlyModelRefusesToTranslateThroughTheMainService(service: Service, shortSpeech: bytes) -> None:
    """tiny.en cannot translate: whisper's 501 reaches the SDK unchanged, as for turbo models (German translated by
    the multilingual base is in tests/test_sttLanguages.py)."""
    with pytest.raises(openai.APIStatusError) as refused:
        await service.sdk.audio.translations.create(file=("speech.wav", shortSpeech), model="whisper-1",
                                                    response_format="verbose_json")
    assert refused.value.status_code == 501 and refused.value.body["code"] == "translation_unavailable"
    assert "is English-only and cannot translate" in refused.value.message
    assert "translation_model to a multilingual model" in refused.value.message
    meta = service.metas[-1]
    assert meta.path == "/v1/audio/translations" and meta.status == 501


async def isListed(service: Service) -> bool:
    return "poweron-transcribe" in [model.id async for model in service.sdk.models.list()]


async def waitForListing(service: Service, listed: bool, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while await isListed(service) != listed:
            await asyncio.sleep(0.1)


@pytest.mark.stt
async def test_transcribeLeavesTheListWhileWhisperIsDownAndComesBack(service: Service,
                                                                       whisper: WhisperProcess) -> None:
    await waitForListing(service, True)
    whisper.stop()
    try:
        await waitForListing(service, False)
        with pytest.raises(openai.APIStatusError) as down:
            await service.sdk.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="whisper-1")
        assert down.value.status_code == 503
    finally:
        whisper.start()
    await waitForListing(service, True)


@pytest.mark.stt
async def test_chunkedUploadOverTheLimitIsStoppedByTheProxy(service: Service) -> None:
    boundary = "b0undary"

    async def body() -> AsyncIterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n").encode()
        for _ in range(27):
            yield b"\0" * (1024 * 1024)

    response = await service.http.post("/v1/audio/transcriptions", content=body(), headers={
        "authorization": f"Bearer {OPENAI_KEY}", "content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413 and "25 MiB" in response.json()["error"]["message"]


async def test_missingKeyIs401(makeSettings) -> None:
    async with openService(makeSettings(whisper={"base_url": DEAD_WHISPER_URL, "enabled": True})) as service:
        response = await service.http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")},
                                           data={"model": "whisper-1"})
        assert response.status_code == 401 and "error" in response.json()


async def test_whisperDownIs503AndNotListed(makeSettings) -> None:
    async with openService(makeSettings(whisper={"base_url": DEAD_WHISPER_URL, "enabled": True})) as service:
        with pytest.raises(openai.APIStatusError) as down:
            await service.sdk.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="whisper-1")
        assert down.value.status_code == 503 and "speech-to-text service is not reachable" in down.value.message
        assert int(down.value.response.headers["retry-after"]) > 0
        assert "poweron-transcribe" not in [m.id async for m in service.sdk.models.list()]


async def test_disabledSpeechToTextIs404(makeSettings) -> None:
    async with openService(makeSettings()) as service:
        response = await service.http.post("/v1/audio/translations", files={"file": ("a.wav", b"RIFF")},
                                           data={"model": "whisper-1"},
                                           headers={"authorization": f"Bearer {OPENAI_KEY}"})
        assert response.status_code == 404 and "[whisper] enabled = false" in response.json()["error"]["message"]


async def test_jsonBodyIs400(makeSettings) -> None:
    async with openService(makeSettings(whisper={"base_url": DEAD_WHISPER_URL, "enabled": True})) as service:
        response = await service.http.post("/v1/audio/transcriptions", json={"model": "whisper-1"},
                                           headers={"authorization": f"Bearer {OPENAI_KEY}"})
        assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]


class ScriptedTransport(httpx.AsyncBaseTransport):
    """Plays the whisper service: answers /health, hands every other request (body still streaming) to a handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return await self.handler(request)


@contextlib.asynccontextmanager
async def scriptedService(makeSettings, handler: Handler, **overrides) -> AsyncIterator[Service]:
    settings = makeSettings(whisper={"base_url": DEAD_WHISPER_URL, "enabled": True}, **overrides)
    async with openService(settings) as service:
        async with httpx.AsyncClient(transport=ScriptedTransport(handler)) as scripted:
            registry = service.app.state.registry
            service.app.state.http = registry.http = scripted
            await registry.refresh()
            assert registry.whisperReachable
            yield service


async def test_uploadIsStreamedToWhisperWhileTheClientStillSends(makeSettings) -> None:
    firstChunkForwarded = asyncio.Event()
    received: list[bytes] = []

    async def whisperSide(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers and request.headers["content-type"].endswith("boundary=xyz")
        async for chunk in request.stream:  # type: ignore[union-attr]
            received.append(chunk)
            firstChunkForwarded.set()
        return httpx.Response(200, json={"text": "ok"}, headers={"x-poweron-model": "poweron-transcribe"})

    async def clientSide() -> AsyncIterator[bytes]:
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        await asyncio.wait_for(firstChunkForwarded.wait(), 5)  # times out if the proxy buffers the whole body
        yield b"--xyz--\r\n"

    async with scriptedService(makeSettings, whisperSide) as service:
        response = await service.http.post("/v1/audio/transcriptions", content=clientSide(), headers={
            "authorization": f"Bearer {OPENAI_KEY}", "content-type": "multipart/form-data; boundary=xyz"})
        assert response.status_code == 200 and response.json() == {"text": "ok"}
        assert b"".join(received).endswith(b"--xyz--\r\n")


@pytest.mark.parametrize("status, body, expectedStatus, fragment", [
    (500, b'{"error": {"message": "boom", "type": "api_error"}}', 502, "failed with status 500"),
    (502, b"<html>bad gateway</html>", 502, "failed with status 502"),
    (503, b'{"error": {"message": "busy", "type": "service_unavailable"}}', 503, "busy"),
    (400, b"not json", 400, "rejected the request"),
])
async def test_whisperFailuresMapToClearErrors(makeSettings, status: int, body: bytes, expectedStatus: int,
                                               fragment: str) -> None:
    async def whisperSide(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(status, content=body, headers={"retry-after": "5"})

    async with scriptedService(makeSettings, whisperSide) as service:
        with pytest.raises(openai.APIStatusError) as failed:
            await service.sdk.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="whisper-1")
        assert failed.value.status_code == expectedStatus and fragment in failed.value.message


async def test_brokenStreamEndsWithAnErrorEvent(makeSettings) -> None:
    class BreakingStream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'data: {"type":"transcript.text.delta","delta":"Hello"}\n\n'
            raise httpx.ReadError("connection reset")

    async def whisperSide(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(200, stream=BreakingStream(), headers={"content-type": "text/event-stream"})

    async with scriptedService(makeSettings, whisperSide) as service:
        stream = await service.sdk.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="whisper-1",
                                                               stream=True)
        with pytest.raises(openai.APIError) as broken:
            async for event in stream:
                assert event.delta == "Hello"
        assert "speech-to-text service" in broken.value.message


async def test_emptyBucketGives429WithRetryAfter(makeSettings) -> None:
    settings = makeSettings(whisper={"base_url": DEAD_WHISPER_URL, "enabled": True},
                            ratelimit={"per_key": "cursor=1/1/5"})
    async with openService(settings) as service:
        with pytest.raises(openai.APIStatusError) as first:
            await service.sdk.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="whisper-1")
        assert first.value.status_code == 503  # took the only token; whisper is down
        with pytest.raises(openai.RateLimitError) as limited:
            await service.sdk.audio.transcriptions.create(file=("a.wav", b"RIFF"), model="whisper-1")
    error = limited.value.response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "Rate limit reached for key 'cursor'" in error["message"]
    assert int(limited.value.response.headers["retry-after"]) > 0
    assert service.metas[-1].rateLimited is True


async def test_audioStreamHoldsTheConcurrencySlotUntilItEnds(makeSettings) -> None:
    streaming, finish = asyncio.Event(), asyncio.Event()

    class HeldStream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'data: {"type":"transcript.text.delta","delta":"Hello"}\n\n'
            streaming.set()
            await finish.wait()
            yield b'data: {"type":"transcript.text.done","text":"Hello"}\n\n'

    async def whisperSide(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(200, stream=HeldStream(), headers={"content-type": "text/event-stream"})

    async def transcribe(service: Service) -> httpx.Response:
        return await service.http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")},
                                       data={"model": "whisper-1", "stream": "true"},
                                       headers={"authorization": f"Bearer {OPENAI_KEY}"})

    async with scriptedService(makeSettings, whisperSide, ratelimit={"per_key": "cursor=600/100/1"}) as scripted:
        held = asyncio.create_task(transcribe(scripted))
        await asyncio.wait_for(streaming.wait(), 10)
        during = await asyncio.wait_for(transcribe(scripted), 10)  # without the slot it would wait for finish
        finish.set()
        first = await held
        after = await transcribe(scripted)
    assert during.status_code == 429 and during.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert int(during.headers["retry-after"]) > 0
    assert first.status_code == 200 and parseSse(first.text)[-1]["type"] == "transcript.text.done"
    assert after.status_code == 200
