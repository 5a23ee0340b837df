"""faster-whisper inside the whisper service: one shared model (loaded once, unloaded when idle, loaded again on
demand), a bounded admission queue, and transcription in worker threads, never on the event loop."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import av
import numpy as np

from config import WhisperSettings
from core.errors import ServiceError
from whisperServer.languages import ENGLISH_ONLY
from whisperServer.transcriptFormats import Transcript, TranscriptSegment, segmentFromWhisper

logger = logging.getLogger("poweron.whisper")

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30
BUSY_RETRY_AFTER_SECONDS = 5
TEMPERATURE_LADDER = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
BEAM_SIZE = 5
SILENCE_RMS = 10 ** (-50 / 20)
"""Segments whose audio is quieter than -50 dBFS are dropped: whisper's "You" on silence when the VAD is off."""


class ModelLoadError(Exception):
    """The configured model could not be loaded (missing directory, not downloaded, out of memory)."""


@dataclass(slots=True)
class TranscriptionJob:
    """One request's audio and options; ``audio`` is the uploaded file, decoded in the worker thread."""

    task: str
    audio: IO[bytes]
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    wordTimestamps: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)


class AdmissionControl:
    """At most ``maxConcurrent`` transcriptions run and ``maxQueue`` wait; one more gets 503 with Retry-After."""

    def __init__(self, maxConcurrent: int, maxQueue: int) -> None:
        self.maxConcurrent = maxConcurrent
        self.maxQueue = maxQueue
        self.admitted = 0

    def check(self) -> None:
        """503 with Retry-After when every running slot and queue place is taken (cheap; before the upload)."""
        if self.admitted >= self.maxConcurrent + self.maxQueue:
            raise ServiceError(503, f"The speech-to-text service is busy ({self.running} running, {self.waiting} "
                               "waiting); retry shortly", code="stt_busy",
                               headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})

    def admit(self) -> None:
        self.check()
        self.admitted += 1

    def release(self) -> None:
        self.admitted = max(0, self.admitted - 1)

    @property
    def running(self) -> int:
        return min(self.admitted, self.maxConcurrent)

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - self.maxConcurrent)


def resolveDevice(device: str) -> str:
    """``auto`` becomes cuda when CTranslate2 sees a GPU, else cpu."""
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def resolveComputeType(computeType: str, device: str) -> str:
    """``default`` becomes float16 on GPU and int8 on CPU."""
    if computeType != "default":
        return computeType
    return "float16" if device == "cuda" else "int8"


def decodeAudio(audio: IO[bytes], maxSeconds: float) -> np.ndarray:
    """16 kHz mono float32 samples; 415 when the bytes are not audio, 400 when empty, 413 when too long."""
    maxSamples = int(maxSeconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(audio, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise _notAudio("it has no audio track")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in itertools.chain(_validFrames(container.decode(audio=0)), [None]):
                for resampled in resampler.resample(frame):
                    chunks.append(resampled.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                    if total > maxSamples:
                        raise ServiceError(413, f"The audio is longer than the limit of {maxSeconds:.0f} seconds; "
                                           "split it into shorter files", code="audio_too_long", param="file")
    except (av.error.EOFError, EOFError):
        raise _notAudio("it ends before its data is complete: truncated or damaged") from None
    except (av.error.FFmpegError, IndexError, ValueError):
        raise _notAudio("not a recognised audio format") from None
    finally:
        gc.collect()  # PyAV's resampler frees its buffers only on collection (faster-whisper#390)
    if total == 0:
        raise ServiceError(400, "The file contains no audio samples (empty or truncated recording)",
                           code="empty_audio", param="file")
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def _validFrames(frames: Any) -> Any:
    """Skip single undecodable frames inside an otherwise valid file (as faster-whisper does)."""
    iterator = iter(frames)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def _notAudio(reason: str) -> ServiceError:
    return ServiceError(415, f"The file could not be decoded as audio ({reason}); send flac, mp3, mp4, mpeg, mpga, "
                        "m4a, ogg, wav or webm", code="unsupported_audio", param="file")


class LoadedModel:
    """A faster-whisper model (and its batched pipeline) whose weights can be unloaded and loaded again."""

    def __init__(self, name: str, settings: WhisperSettings) -> None:
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        self.name = name
        self.device = resolveDevice(settings.device)
        self.computeType = resolveComputeType(settings.compute_type, self.device)
        localOnly = os.path.isdir(name) or not settings.allow_download
        try:
            self.model = self._create(WhisperModel, name, settings, localOnly)
        except Exception as exc:
            if settings.device != "auto" or self.device == "cpu":
                raise ModelLoadError(_describeLoadError(name, exc, localOnly)) from None
            logger.warning("whisper: %s on cuda failed (%s); falling back to cpu/int8", name, type(exc).__name__)
            self.device, self.computeType = "cpu", "int8"
            try:
                self.model = self._create(WhisperModel, name, settings, localOnly)
            except Exception as exc2:
                raise ModelLoadError(_describeLoadError(name, exc2, localOnly)) from None
        self.pipeline = BatchedInferencePipeline(model=self.model) if settings.batched else None
        self.supportedLanguages = frozenset(self.model.supported_languages)

    def _create(self, factory: Any, name: str, settings: WhisperSettings, localOnly: bool) -> Any:
        return factory(name, device=self.device, compute_type=self.computeType, cpu_threads=settings.cpu_threads,
                       local_files_only=localOnly)

    @property
    def isLoaded(self) -> bool:
        return bool(self.model.model.model_is_loaded)

    def ensureLoaded(self) -> None:
        if not self.isLoaded:
            self.model.model.load_model()

    def unload(self) -> None:
        if self.isLoaded:
            self.model.model.unload_model()

    def warmUp(self, withVad: bool) -> None:
        """One second of silence through the model (and the VAD), so the first request pays no set-up cost."""
        silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
        segments, _ = self.model.transcribe(silence, beam_size=1, vad_filter=False, without_timestamps=True)
        list(segments)
        if withVad:
            segments, _ = self.model.transcribe(silence, vad_filter=True)
            list(segments)


def _describeLoadError(name: str, exc: Exception, localOnly: bool) -> str:
    if localOnly and not os.path.isdir(name):
        return (f"cannot load the whisper model '{name}': it is not a local model directory and not in the Hugging "
                "Face cache (downloads are off); point [whisper] model at a local CTranslate2 model directory, or "
                "set [whisper] allow_download = true once to fetch it")
    detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return f"cannot load the whisper model '{name}': {detail}"


class WhisperEngine:
    """The shared models, the admission queue and the worker threads of the whisper service."""

    def __init__(self, settings: WhisperSettings) -> None:
        self.settings = settings
        self.admission = AdmissionControl(settings.max_concurrent, settings.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=settings.max_concurrent, thread_name_prefix="whisper")
        self.models: dict[str, LoadedModel] = {}
        self.loadLock = threading.Lock()
        self.lastUsed = time.monotonic()
        self.active = 0

    def modelNameFor(self, task: str) -> str:
        if task == "translate" and self.settings.translation_model:
            return self.settings.translation_model
        return self.settings.model

    def translationProblem(self) -> str | None:
        """Why translations cannot be served, or None: turbo models answer in the source language, English-only
        models (tiny.en; known once loaded) in English-sounding words. Not loaded yet: the worker checks."""
        name = self.modelNameFor("translate")
        if "turbo" in os.path.basename(name.rstrip("/")).lower():
            return (f"Translation is not available: the model {name} cannot translate (it answers in the original "
                    "language); set [whisper] translation_model, e.g. large-v3")
        loaded = self.models.get(name)
        englishOnly = loaded is not None and loaded.supportedLanguages == ENGLISH_ONLY
        return englishOnlyRefusal(name) if englishOnly else None

    def acquireModel(self, task: str) -> LoadedModel:
        """The model for ``task``, created on first use, its weights loaded again after an idle unload; marks it
        in use so the idle unloader leaves it alone until ``releaseModel``."""
        name = self.modelNameFor(task)
        with self.loadLock:
            loaded = self.models.get(name)
            if loaded is None:
                started = time.perf_counter()
                loaded = self.models[name] = LoadedModel(name, self.settings)
                logger.info("whisper: loaded %s on %s/%s in %.1f s", name, loaded.device, loaded.computeType,
                            time.perf_counter() - started)
            else:
                loaded.ensureLoaded()
            self.active += 1
            return loaded

    def preload(self) -> None:
        """Load and warm up the transcription model now (at start), so the first request does not wait for it."""
        name = self.modelNameFor("transcribe")
        if name in self.models:
            return
        self.acquireModel("transcribe").warmUp(self.settings.vad)
        self.releaseModel()

    def releaseModel(self) -> None:
        with self.loadLock:
            self.active -= 1
            self.lastUsed = time.monotonic()

    def supportedLanguages(self) -> frozenset[str]:
        loaded = self.models.get(self.modelNameFor("transcribe"))
        return loaded.supportedLanguages if loaded else frozenset()

    def unloadIfIdle(self) -> bool:
        """Unload all weights when nothing ran for idle_unload_seconds; True when something was unloaded."""
        with self.loadLock:
            idleFor = time.monotonic() - self.lastUsed
            if self.settings.idle_unload_seconds <= 0 or self.active or idleFor < self.settings.idle_unload_seconds:
                return False
            loadedModels = [m for m in self.models.values() if m.isLoaded]
            for loaded in loadedModels:
                loaded.unload()
        if loadedModels:
            logger.info("whisper: unloaded %d model(s) after %.0f s idle", len(loadedModels), idleFor)
        return bool(loadedModels)

    async def runIdleUnloader(self) -> None:
        interval = max(0.1, min(5.0, self.settings.idle_unload_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.unloadIfIdle)

    def _segments(self, loaded: LoadedModel, job: TranscriptionJob, samples: np.ndarray) -> tuple[Any, Any]:
        """Start faster-whisper on the decoded samples; returns its lazy segment generator and info."""
        options: dict[str, Any] = dict(
            language=job.language, task=job.task, initial_prompt=job.prompt or None, beam_size=BEAM_SIZE,
            temperature=list(TEMPERATURE_LADDER) if job.temperature == 0 else job.temperature,
            word_timestamps=job.wordTimestamps, vad_filter=self.settings.vad)
        if loaded.pipeline is None:
            return loaded.model.transcribe(samples, **options)
        duration = samples.shape[0] / SAMPLE_RATE
        if not self.settings.vad and duration >= CHUNK_SECONDS:
            options["clip_timestamps"] = [{"start": s, "end": min(s + CHUNK_SECONDS, duration)}
                                          for s in range(0, int(duration) + 1, CHUNK_SECONDS) if s < duration]
        return loaded.pipeline.transcribe(samples, batch_size=self.settings.batch_size, without_timestamps=False,
                                          **options)

    def _run(self, job: TranscriptionJob, onSegment: Callable[[TranscriptSegment], None] | None) -> Transcript:
        """The whole transcription in a worker thread: decode, then iterate faster-whisper's lazy generator."""
        if job.cancelled.is_set():
            raise ServiceError(499, "The client went away before the transcription started", code="cancelled")
        samples = decodeAudio(job.audio, self.settings.max_audio_seconds)
        try:
            loaded = self.acquireModel(job.task)
        except ModelLoadError as exc:
            raise ServiceError(503, f"Speech-to-text is unavailable: {exc}", code="stt_model_unavailable",
                               headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)}) from None
        try:
            if job.task == "translate" and loaded.supportedLanguages == ENGLISH_ONLY:
                raise ServiceError(501, englishOnlyRefusal(loaded.name), code="translation_unavailable")
            generator, info = self._segments(loaded, job, samples)
            segments: list[TranscriptSegment] = []
            for raw in generator:
                if job.cancelled.is_set():
                    break
                if isSilentSpan(samples, raw.start, raw.end):
                    continue
                previousEnd = segments[-1].end if segments else 0.0
                segment = segmentFromWhisper(raw, len(segments), previousEnd)
                segments.append(segment)
                if onSegment is not None:
                    onSegment(segment)
            return Transcript(task=job.task, language=info.language, duration=float(info.duration),
                              segments=segments)
        finally:
            self.releaseModel()

    def _submit(self, job: TranscriptionJob,
                onSegment: Callable[[TranscriptSegment], None] | None = None) -> asyncio.Future[Transcript]:
        """Admit the job (503 when the queue is full) and run it in a worker thread; released when it ends."""
        self.admission.admit()
        loop = asyncio.get_running_loop()
        future: Future[Transcript] = self.executor.submit(self._run, job, onSegment)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.admission.release))
        running = asyncio.wrap_future(future)
        running.add_done_callback(_retrieveOutcome)
        return running

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        """Run the job to the end; a client that goes away cancels it between segments."""
        running = self._submit(job)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def stream(self, job: TranscriptionJob) -> AsyncIterator[TranscriptSegment | Transcript]:
        """Segments as the worker finishes them, then the whole Transcript; the job's errors raise from here."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TranscriptSegment] = asyncio.Queue()
        running = self._submit(job, lambda segment: loop.call_soon_threadsafe(queue.put_nowait, segment))
        nextSegment: asyncio.Future[TranscriptSegment] | None = None
        try:
            while True:
                nextSegment = asyncio.ensure_future(queue.get())
                await asyncio.wait({nextSegment, running}, return_when=asyncio.FIRST_COMPLETED)
                if nextSegment.done():
                    yield nextSegment.result()
                    continue
                while not queue.empty():
                    yield queue.get_nowait()
                yield running.result()
                return
        finally:
            job.cancelled.set()
            if nextSegment is not None:
                nextSegment.cancel()

    def close(self) -> None:
        """Stop the worker threads (waiting jobs are dropped) and free the weights unless a job still runs."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self.loadLock:
            if self.active == 0:
                for loaded in self.models.values():
                    loaded.unload()


def englishOnlyRefusal(name: str) -> str:
    return (f"Translation is not available: the model {name} is English-only and cannot translate (it transcribes "
            "English speech only); set [whisper] translation_model to a multilingual model, e.g. large-v3")


def isSilentSpan(samples: np.ndarray, start: float, end: float) -> bool:
    """True when the samples from ``start`` to ``end`` seconds are (nearly) digital silence."""
    span = samples[int(start * SAMPLE_RATE):max(int(end * SAMPLE_RATE), int(start * SAMPLE_RATE) + 1)]
    return span.size == 0 or float(np.sqrt(np.mean(np.square(span)))) < SILENCE_RMS


def _retrieveOutcome(future: asyncio.Future[Any]) -> None:
    """Mark a job's outcome as seen even when its client went away (no 'exception never retrieved' noise)."""
    if not future.cancelled():
        future.exception()
