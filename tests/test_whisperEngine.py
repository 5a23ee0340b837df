"""The whisper service in-process with faster-whisper tiny.en (no process start per setting): the options each
[whisper] setting and form field hands to faster-whisper, the bounded queue, and the CUDA-to-CPU fallback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from config import WhisperSettings
from tests.whisperSupport import (
    LONG_TEXT,
    MAX_WORD_ERROR_RATE,
    SHORT_TEXT,
    TINY_EN_DIR,
    padWithSilence,
    silenceWav,
    speak,
    wordErrorRate,
)
from whisperServer import engine as whisperEngine
from whisperServer.engine import LoadedModel, WhisperEngine
from whisperServer.service import createWhisperApp

pytestmark = pytest.mark.stt
PATH = "/v1/audio/transcriptions"
TINY_SETTINGS = {"model": str(TINY_EN_DIR), "device": "cpu", "compute_type": "int8", "cpu_threads": 2}


@pytest.fixture(scope="module")
def workDir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("whisperEngine")


@pytest.fixture(scope="module")
def speech(workDir: Path) -> dict[str, bytes]:
    return {"short": speak(SHORT_TEXT, workDir / "short.wav").read_bytes(),
            "long": speak(LONG_TEXT, workDir / "long.wav", wordsPerMinute=140).read_bytes()}


class Spy:
    """Wraps a faster-whisper ``transcribe`` method and keeps the keyword arguments of every call."""

    def __init__(self, target: Any) -> None:
        self.target, self.calls = target, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.target(*args, **kwargs)


class InProcessWhisper:
    """A preloaded engine for some [whisper] settings, with spies on the model's and the pipeline's transcribe."""

    def __init__(self, **settings: Any) -> None:
        self.whisperSettings = {**TINY_SETTINGS, **settings}
        self.engine = WhisperEngine(WhisperSettings(**self.whisperSettings))
        self.engine.preload()
        self.loaded = self.engine.models[str(TINY_EN_DIR)]
        self.modelSpy = self.loaded.model.transcribe = Spy(self.loaded.model.transcribe)
        self.pipelineSpy = None
        if self.loaded.pipeline is not None:
            self.pipelineSpy = self.loaded.pipeline.transcribe = Spy(self.loaded.pipeline.transcribe)

    def client(self, makeSettings) -> httpx.AsyncClient:
        app = createWhisperApp(makeSettings(whisper=self.whisperSettings), self.engine)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://whisper", timeout=120)


@pytest.fixture(scope="module")
def unbatched() -> Iterator[InProcessWhisper]:
    whisper = InProcessWhisper(batched=False)
    yield whisper
    whisper.engine.close()


@pytest.fixture(scope="module")
def withoutVad() -> Iterator[InProcessWhisper]:
    whisper = InProcessWhisper(vad=False)
    yield whisper
    whisper.engine.close()


async def transcribe(whisper: InProcessWhisper, makeSettings, audio: bytes, **fields: str) -> httpx.Response:
    async with whisper.client(makeSettings) as http:
        return await http.post(PATH, files={"file": ("a.wav", audio)}, data={"model": "whisper-1", **fields})


async def test_unbatchedEngineTranscribesWithTheModelItself(unbatched: InProcessWhisper, makeSettings,
                                                            speech: dict[str, bytes]) -> None:
    response = await transcribe(unbatched, makeSettings, speech["short"])
    assert wordErrorRate(SHORT_TEXT, response.json()["text"]) < MAX_WORD_ERROR_RATE, response.text
    assert unbatched.pipelineSpy is None
    assert unbatched.modelSpy.calls[-1]["vad_filter"] is True and "batch_size" not in unbatched.modelSpy.calls[-1]


async def test_silenceWithoutVadIsAnEmptyTranscript(withoutVad: InProcessWhisper, makeSettings) -> None:
    response = await transcribe(withoutVad, makeSettings, silenceWav(3.0))
    assert response.status_code == 200 and response.json()["text"] == ""
    assert withoutVad.pipelineSpy.calls[-1]["vad_filter"] is False
    assert "clip_timestamps" not in withoutVad.pipelineSpy.calls[-1]


async def test_longAudioWithoutVadIsCutInto30SecondClips(withoutVad: InProcessWhisper, makeSettings,
                                                         speech: dict[str, bytes]) -> None:
    audio = padWithSilence(speech["short"], seconds=31.0)
    response = await transcribe(withoutVad, makeSettings, audio, response_format="verbose_json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert 30.9 < body["duration"] < 31.1
    assert wordErrorRate(SHORT_TEXT, body["text"]) < MAX_WORD_ERROR_RATE, body["text"]
    clips = withoutVad.pipelineSpy.calls[-1]["clip_timestamps"]
    assert [clip["start"] for clip in clips] == [0, 30] and clips[0]["end"] == 30
    assert clips[1]["end"] == pytest.approx(31.0, abs=0.05)


async def test_promptAndLanguageReachTheModel(withoutVad: InProcessWhisper, makeSettings,
                                              speech: dict[str, bytes]) -> None:
    prompt = "Glossary: PowerOn, Kiva, energy cooperative."
    response = await transcribe(withoutVad, makeSettings, speech["short"], prompt=f"  {prompt} ", language="EN")
    assert wordErrorRate(SHORT_TEXT, response.json()["text"]) < MAX_WORD_ERROR_RATE, response.text
    options = withoutVad.pipelineSpy.calls[-1]
    assert options["initial_prompt"] == prompt and options["language"] == "en" and options["task"] == "transcribe"
    await transcribe(withoutVad, makeSettings, speech["short"])
    assert withoutVad.pipelineSpy.calls[-1]["initial_prompt"] is None
    assert withoutVad.pipelineSpy.calls[-1]["language"] is None


async def waitUntil(condition: Any, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def test_queuedRequestWaitsAndTheNextBeyondTheQueueGets503(makeSettings, speech: dict[str, bytes]) -> None:
    whisper = InProcessWhisper(max_concurrent=1, max_queue=1)
    admission = whisper.engine.admission
    try:
        async with whisper.client(makeSettings) as http:
            def post() -> Any:
                return http.post(PATH, files={"file": ("l.wav", speech["long"])}, data={"model": "whisper-1"})

            running = asyncio.create_task(post())
            await waitUntil(lambda: admission.running == 1)
            queued = asyncio.create_task(post())
            await waitUntil(lambda: admission.waiting == 1)
            refused = await post()
            assert not running.done() and not queued.done()
            responses = [await running, await queued]
    finally:
        whisper.engine.close()
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    error = refused.json()["error"]
    assert error["code"] == "stt_busy" and "1 running, 1 waiting" in error["message"]
    for response in responses:
        assert response.status_code == 200 and wordErrorRate(LONG_TEXT, response.json()["text"]) < MAX_WORD_ERROR_RATE


def test_cudaLoadFailureFallsBackToCpuInt8(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(whisperEngine, "resolveDevice", lambda device: "cuda" if device == "auto" else device)
    caplog.set_level(logging.WARNING, logger="poweron.whisper")
    loaded = LoadedModel(str(TINY_EN_DIR), WhisperSettings(**{**TINY_SETTINGS, "device": "auto",
                                                               "compute_type": "default"}))
    assert (loaded.device, loaded.computeType) == ("cpu", "int8") and loaded.isLoaded
    assert "on cuda failed" in caplog.text and "falling back to cpu/int8" in caplog.text
    segments, info = loaded.model.transcribe(np.zeros(16_000, dtype=np.float32), beam_size=1)
    assert list(segments) == [] and info.duration == pytest.approx(1.0)
    loaded.unload()
