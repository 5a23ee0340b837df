"""A stand-in for the whisper service (whisperServer) in tests: its HTTP contract without a model, plus faults
that can be switched while the main service forwards to it.

Shared with whisperServer.service by construction (the same code is called): the multipart reading and validation
(``readLimitedForm``, ``parseAudioForm``: the same 4xx/413 messages, ``model`` resolved by config.resolveModel), the
response formats (transcriptFormats: json, text, srt, vtt, verbose_json with their media types), the SSE framing
(``sseEvent``: one ``transcript.text.delta`` per segment, the first one left-stripped, then ``transcript.text.done``
with the whole text; ``Cache-Control: no-cache``), the busy answer (whisperEngine.AdmissionControl: 503 ``stt_busy``
with ``Retry-After: 5``, sent before the upload is read, as the real admission check is), the OpenAI error envelope
(errors.openAiErrorBody), ``X-PowerOn-Model`` and ``X-Request-ID`` on answers, and ``GET /health``'s fields.
Faked: the transcript. The audio is read whole (streamed, like the real service) but not decoded; the answer has
``segments`` segments "Segment N of the stub transcript." (``stubText``) and lasts upload bytes / 32 000 seconds.

In tests:  with WhisperStub() as stub: ...; stub.configure(fault="hang"); stub.waitForEvent("clientGone")
Alone:     python -m tests.whisperStub --port 9000

Configuration (Python: ``stub.configure(**keys)``, ``stub.clearFault()``, ``stub.reset()``; HTTP: ``POST
/_stub/config`` with the same keys as JSON, ``GET /_stub/config``, ``POST /_stub/reset``; the keys and meanings of
the Ollama stub's fault API, applied to the audio endpoints):
  fault          None | "busy" | "hang" | "slowFirstToken" | "midstreamError" | "truncate" | "malformedLine"
  faultPaths     the paths the fault applies to (default both audio endpoints)
  faultCount     how many matching requests get the fault; -1 = until cleared (setting ``fault`` alone resets it)
  faultDelayMs   the first-byte delay of "slowFirstToken" (default 2000)
  segments       segments per transcript (default 2)
  eventDelayMs   pause before each stream event after the first one (default 0): a slow or stalled stream
  busy            503 {"error": {"message": "The speech-to-text service is busy (1 running, 8 waiting); retry
                  shortly", "code": "stt_busy", ...}} with Retry-After: 5, before the upload is read
  hang            reads the whole upload, never answers, until the client goes away
  slowFirstToken  reads the upload, waits faultDelayMs (ended early by a client that leaves), then answers normally
  midstreamError  stream: the first delta event, then an error event (``data: {"error": {...}}``) and the end;
                  otherwise: 500 with whisperService's internal-error envelope (its answer to an unexpected failure)
  truncate        stream: the first delta event, then the connection is closed (no done event, no final chunk);
                  otherwise: status, headers with the full Content-Length, half the body, then the connection closed
  malformedLine   stream: the first delta event, then a data line that is not JSON, then the rest; json and
                  verbose_json: 200 with a body that is not JSON (text, srt and vtt are answered normally)
Faults hit only requests that pass validation (a 400/404/413 is answered as usual and uses up no faultCount), except
busy, which comes first like the real admission check. "down" and "restart mid-load": ``stop()`` cuts every open
connection like a killed process; ``start()``/``restart(downtime)`` come back on the same port.

Events (``stub.events(kind)``, ``GET /_stub/events``), each with ``kind``, ``path``, ``requestId`` (the forwarded
X-Request-ID) and ``at`` (monotonic seconds): ``request`` (seen), ``fault`` {fault}, ``uploaded`` {bytes} (the whole
upload was read), ``answered`` {status}, ``clientGone`` {phase: "upload" | "waiting" | "stream"} (the caller closed
the connection before the answer was complete).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from config import WhisperSettings, buildModelMapping
from core.errors import ServiceError, openAiErrorBody
from tests.ollamaStub import ThreadedServer
from whisperServer.engine import AdmissionControl
from whisperServer.service import (FORM_OVERHEAD_BYTES, AudioRequest, doneEvent, parseAudioForm, readLimitedForm,
                                   sseEvent)
from whisperServer.transcriptFormats import MEDIA_TYPES, Transcript, TranscriptSegment, renderTranscript

HOST = "127.0.0.1"
AUDIO_PATHS = {"/v1/audio/transcriptions": "transcribe", "/v1/audio/translations": "translate"}
FAULTS = ("busy", "hang", "slowFirstToken", "midstreamError", "truncate", "malformedLine")
STUB_MODEL = "poweron-transcribe"
SEGMENT_TEXT = " Segment {number} of the stub transcript."
BYTES_PER_SECOND = 32_000
"""16 kHz, 16-bit mono: the duration the stub reports for an upload."""
MAX_QUEUE = 8
STREAM_ERROR_MESSAGE = "The transcription failed after its first segment (stub injected failure)"
INTERNAL_ERROR = ServiceError(500, "Internal error; the request id in the logs tells more", errorType="api_error",
                              code="internal_error")
"""What whisperService answers to an unexpected exception (errors._handleUnexpected)."""
MALFORMED_EVENT = b"data: {\"type\": \"transcript.text.delta\", \"delta\": \n\n"
MALFORMED_BODY = b"{\"text\": \"Segment 1 of the"
EVENT_LIMIT = 2000
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "fault": (str, type(None)), "faultPaths": (list, tuple), "faultCount": (int,), "faultDelayMs": (int, float),
    "segments": (int,), "eventDelayMs": (int, float)}


def stubText(segments: int = 2) -> str:
    """The text of every transcript the stub produces with ``segments`` segments."""
    return "".join(SEGMENT_TEXT.format(number=n) for n in range(1, segments + 1)).strip()


@dataclass(frozen=True, slots=True)
class StubConfig:
    """The switchable behaviour; replaced as a whole (read by the server thread, written by the test thread)."""

    fault: str | None = None
    faultPaths: tuple[str, ...] = tuple(AUDIO_PATHS)
    faultCount: int = -1
    faultDelayMs: float = 2000.0
    segments: int = 2
    eventDelayMs: float = 0.0

    def asDict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CONFIG_TYPES}


def checkedConfig(current: StubConfig, keys: dict[str, Any]) -> StubConfig:
    """``current`` with ``keys`` applied; ValueError for unknown keys, wrong types or values."""
    for name, value in keys.items():
        if name not in CONFIG_TYPES:
            raise ValueError(f"unknown config key {name!r}; known: {', '.join(CONFIG_TYPES)}")
        if not isinstance(value, CONFIG_TYPES[name]) or isinstance(value, bool):
            raise ValueError(f"config key {name!r} has the wrong type: {type(value).__name__}")
    if keys.get("fault") not in (None, *FAULTS):
        raise ValueError(f"unknown fault {keys['fault']!r}; known: {', '.join(FAULTS)}")
    if keys.get("segments", 1) < 1 or keys.get("faultDelayMs", 0) < 0 or keys.get("eventDelayMs", 0) < 0:
        raise ValueError("segments must be >= 1, faultDelayMs and eventDelayMs >= 0")
    if "fault" in keys and "faultCount" not in keys:
        keys = {**keys, "faultCount": -1}
    if "faultPaths" in keys:
        keys = {**keys, "faultPaths": tuple(keys["faultPaths"])}
    return replace(current, **keys)


@dataclass(slots=True)
class StubState:
    """Configuration and event log, shared by the server thread and the test thread (under ``lock``)."""

    config: StubConfig = field(default_factory=StubConfig)
    eventLog: collections.deque = field(default_factory=lambda: collections.deque(maxlen=EVENT_LIMIT))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def configure(self, keys: dict[str, Any]) -> StubConfig:
        with self.lock:
            self.config = checkedConfig(self.config, keys)
            return self.config

    def reset(self) -> None:
        with self.lock:
            self.config = StubConfig()
            self.eventLog.clear()

    def takeFault(self, path: str) -> StubConfig | None:
        """The configuration, when a fault applies to this request (and counts it); else None."""
        with self.lock:
            config = self.config
            if config.fault is None or path not in config.faultPaths or config.faultCount == 0:
                return None
            if config.faultCount > 0:
                self.config = replace(config, faultCount=config.faultCount - 1)
            return config

    def addEvent(self, kind: str, path: str, requestId: str, **fields: Any) -> None:
        with self.lock:
            self.eventLog.append({"kind": kind, "path": path, "requestId": requestId, "at": time.monotonic(),
                                  **fields})

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(event) for event in self.eventLog if kind is None or event["kind"] == kind]


def stubSettings(maxUploadBytes: int) -> Any:
    """What parseAudioForm reads of the settings: the [whisper] section and the model mapping (no config.ini)."""
    return _FormSettings(WhisperSettings(max_upload_bytes=maxUploadBytes), buildModelMapping({}))


@dataclass(frozen=True, slots=True)
class _FormSettings:
    whisper: WhisperSettings
    modelMapping: dict[str, Any]


def busyError() -> ServiceError:
    """The real admission check's answer with every running slot and queue place taken."""
    admission = AdmissionControl(1, MAX_QUEUE)
    admission.admitted = 1 + MAX_QUEUE
    try:
        admission.check()
    except ServiceError as exc:
        return exc
    raise AssertionError("AdmissionControl.check() let a full queue pass")


def fakeTranscript(task: str, uploadBytes: int, segments: int) -> Transcript:
    duration = max(0.5, uploadBytes / BYTES_PER_SECOND)
    step = duration / segments
    parts = [TranscriptSegment(id=n, seek=0, start=round(n * step, 3), end=round((n + 1) * step, 3),
                               text=SEGMENT_TEXT.format(number=n + 1), tokens=[50364 + n], temperature=0.0,
                               avg_logprob=-0.2, compression_ratio=1.1, no_speech_prob=0.01)
             for n in range(segments)]
    return Transcript(task=task, language="en", duration=duration, segments=parts)


class AudioExchange:
    """One request to an audio endpoint: fault choice, upload, answer, and the caller's disconnect."""

    def __init__(self, state: StubState, scope: Scope, receive: Receive, send: Send, maxUploadBytes: int) -> None:
        self.state, self.scope, self.receive, self.send = state, scope, receive, send
        self.path: str = scope["path"]
        self.maxUploadBytes = maxUploadBytes
        self.requestId = headerOf(scope, b"x-request-id") or uuid.uuid4().hex
        self.phase = "upload"
        self.gone = asyncio.Event()
        self.watcher: asyncio.Task | None = None

    def event(self, kind: str, **fields: Any) -> None:
        self.state.addEvent(kind, self.path, self.requestId, **fields)

    async def run(self) -> None:
        self.event("request")
        try:
            await self._serve()
        except ServiceError as exc:
            await self.sendBody(exc.status, orjson.dumps(openAiErrorBody(exc)), b"application/json",
                                [(b"x-request-id", self.requestId.encode()),
                                 *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())])
        finally:
            if self.watcher is not None:
                self.watcher.cancel()

    async def _serve(self) -> None:
        config = self.state.config
        if config.fault == "busy" and (busy := self.state.takeFault(self.path)) is not None:
            self.event("fault", fault=busy.fault)
            raise busyError()
        form = await self.readUpload()
        if form is None:
            return
        try:
            audio = parseAudioForm(form, AUDIO_PATHS[self.path], stubSettings(self.maxUploadBytes), frozenset())
            size = audio.job.audio.seek(0, 2)
            faulty = self.state.takeFault(self.path) if config.fault != "busy" else None
            if faulty is not None:
                self.event("fault", fault=faulty.fault)
            await self.answer(audio, fakeTranscript(audio.job.task, size, self.state.config.segments), faulty)
        finally:
            await form.close()

    async def readUpload(self) -> Any:
        """The parsed form (streamed, size-limited), or None when the caller left during the upload."""
        received = 0

        async def countingReceive() -> Any:
            nonlocal received
            message = await self.receive()
            received += len(message.get("body", b""))
            return message

        try:
            form = await readLimitedForm(Request(self.scope, countingReceive),
                                         self.maxUploadBytes + FORM_OVERHEAD_BYTES)
        except ClientDisconnect:
            self.event("clientGone", phase="upload", bytes=received)
            return None
        self.event("uploaded", bytes=received)
        self.phase = "waiting"
        self.watcher = asyncio.ensure_future(self.watchCaller())
        return form

    async def watchCaller(self) -> None:
        """After the upload: notes the caller closing the connection before the answer is complete."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if self.phase != "answered":
            self.event("clientGone", phase=self.phase)
            self.gone.set()

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False (at once) when the caller went away."""
        if seconds <= 0:
            return not self.gone.is_set()
        try:
            await asyncio.wait_for(self.gone.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def answer(self, audio: AudioRequest, transcript: Transcript, faulty: StubConfig | None) -> None:
        fault = faulty.fault if faulty is not None else None
        if fault == "hang":
            await self.gone.wait()
            return
        if fault == "slowFirstToken" and not await self.pause(faulty.faultDelayMs / 1000):
            return
        if audio.stream:
            await self.sendEvents(transcript, fault)
        else:
            await self.sendWhole(audio, transcript, fault)

    def answerHeaders(self) -> list[tuple[bytes, bytes]]:
        """On every answer of the real service: the request id (its middleware); the model on successful ones."""
        return [(b"x-poweron-model", STUB_MODEL.encode()), (b"x-request-id", self.requestId.encode())]

    async def sendBody(self, status: int, body: bytes, contentType: bytes,
                       extra: list[tuple[bytes, bytes]] | None = None) -> None:
        headers = [(b"content-type", contentType), (b"content-length", b"%d" % len(body)),
                   *(extra or [(b"x-request-id", self.requestId.encode())])]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
        self.phase = "answered"
        self.event("answered", status=status)

    async def sendWhole(self, audio: AudioRequest, transcript: Transcript, fault: str | None) -> None:
        rendered = renderTranscript(transcript, audio.responseFormat, audio.withWords)
        body = orjson.dumps(rendered) if isinstance(rendered, dict) else rendered.encode()
        mediaType = MEDIA_TYPES[audio.responseFormat].encode()
        if fault == "midstreamError":
            await self.sendBody(500, orjson.dumps(openAiErrorBody(INTERNAL_ERROR)), b"application/json")
        elif fault == "truncate":
            headers = [(b"content-type", mediaType), (b"content-length", b"%d" % len(body)), *self.answerHeaders()]
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            self.phase = "stream"
            await self.send({"type": "http.response.body", "body": body[:len(body) // 2], "more_body": True})
        elif fault == "malformedLine" and isinstance(rendered, dict):
            await self.sendBody(200, MALFORMED_BODY, mediaType, self.answerHeaders())
        else:
            await self.sendBody(200, body, mediaType, self.answerHeaders())

    async def sendEvents(self, transcript: Transcript, fault: str | None) -> None:
        """whisperService's event stream; returning without the final chunk makes uvicorn close the connection."""
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   *self.answerHeaders()]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        self.phase = "stream"
        for index, segment in enumerate(transcript.segments):
            if index and not await self.pause(self.state.config.eventDelayMs / 1000):
                return
            delta = segment.text.lstrip() if index == 0 else segment.text
            await self.sendEvent(sseEvent({"type": "transcript.text.delta", "delta": delta}))
            if index == 0 and fault == "truncate":
                return
            if index == 0 and fault == "midstreamError":
                error = ServiceError(500, STREAM_ERROR_MESSAGE, code="stt_failed", errorType="api_error")
                await self.sendEvent(sseEvent(openAiErrorBody(error)), final=True)
                return
            if index == 0 and fault == "malformedLine":
                await self.sendEvent(MALFORMED_EVENT)
        if not await self.pause(self.state.config.eventDelayMs / 1000):
            return
        await self.sendEvent(doneEvent(transcript), final=True)

    async def sendEvent(self, event: bytes, final: bool = False) -> None:
        await self.send({"type": "http.response.body", "body": event, "more_body": True})
        if final:
            await self.send({"type": "http.response.body", "body": b""})
            self.phase = "answered"
            self.event("answered", status=200)


def headerOf(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class WhisperStubApp:
    """Pure ASGI: /health, the two audio endpoints, the control API under /_stub."""

    def __init__(self, state: StubState, maxUploadBytes: int) -> None:
        self.state = state
        self.maxUploadBytes = maxUploadBytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in AUDIO_PATHS and method == "POST":
            await AudioExchange(self.state, scope, receive, send, self.maxUploadBytes).run()
        elif path == "/health" and method == "GET":
            await sendJson(send, 200, {"status": "ok", "model": "stub", "loaded": True, "device": "cpu",
                                       "computeType": "int8", "running": 0, "waiting": 0, "maxConcurrent": 1,
                                       "maxQueue": MAX_QUEUE})
        elif path.startswith("/_stub/"):
            await self.control(path, method, scope, receive, send)
        else:
            error = ServiceError(404, f"No route {method} {path}", code="not_found")
            await sendJson(send, 404, openAiErrorBody(error))

    async def control(self, path: str, method: str, scope: Scope, receive: Receive, send: Send) -> None:
        if path == "/_stub/config" and method == "POST":
            try:
                keys = orjson.loads(await Request(scope, receive).body())
                if not isinstance(keys, dict):
                    raise ValueError("send a JSON object")
                config = self.state.configure(keys)
            except (ValueError, orjson.JSONDecodeError) as exc:
                await sendJson(send, 400, {"error": str(exc)})
                return
            await sendJson(send, 200, config.asDict())
        elif path == "/_stub/config":
            await sendJson(send, 200, self.state.config.asDict())
        elif path == "/_stub/reset" and method == "POST":
            self.state.reset()
            await sendJson(send, 200, {"status": "reset"})
        elif path == "/_stub/events":
            await sendJson(send, 200, self.state.events())
        else:
            await sendJson(send, 404, {"error": f"no stub route {method} {path}"})


async def sendJson(send: Send, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


class WhisperStub(ThreadedServer):
    """The stub on a background thread on 127.0.0.1 (a free port unless given); stop()/start()/restart() keep the
    port, the configuration and the events."""

    label = "whisper-stub"

    def __init__(self, port: int = 0, maxUploadBytes: int = WhisperSettings().max_upload_bytes,
                 **config: Any) -> None:
        self.state = StubState()
        self.state.configure(config)
        super().__init__(WhisperStubApp(self.state, maxUploadBytes), HOST, port)

    def configure(self, **keys: Any) -> StubConfig:
        """Change the configuration (keys as in the module docstring); takes effect for the next request."""
        return self.state.configure(keys)

    def clearFault(self) -> None:
        self.state.configure({"fault": None})

    def reset(self) -> None:
        """Default configuration, no events."""
        self.state.reset()

    def events(self, kind: str | None = None, requestId: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.state.events(kind) if requestId is None or e["requestId"] == requestId]

    def waitForEvent(self, kind: str, requestId: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The first event of ``kind`` (for ``requestId``); TimeoutError when none comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not (found := self.events(kind, requestId)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind!r} event for {requestId or 'any request'} within {timeout} s; "
                                   f"events: {self.events(requestId=requestId)}")
            time.sleep(0.01)
        return found[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.whisperStub", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    args = parser.parse_args(argv)
    stub = WhisperStub(port=args.port).start()
    print(f"whisper stub on {stub.baseUrl}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        stub.stop()


if __name__ == "__main__":
    main()
