"""Ollama-compatible stub HTTP server for end-to-end tests, browser tests and benchmarks.

It follows the contract in shared/reference/ollama-api.md: NDJSON streaming (`application/x-ndjson`) ending in a
`done:true` line with `done_reason` and nanosecond metrics, `{"error": ...}` bodies with Ollama's exact messages and
statuses, mid-stream errors (status 200, one error line, no done line), the Host-header check (403, empty body),
405 on a wrong method, tool calls with object `arguments`, `message.thinking` before content, L2-normalised
embeddings, `/api/tags` and `/api/show` with capabilities, cloud models with `remote_host`.

Pure ASGI (no routing framework) served by uvicorn with uvloop + httptools; JSON with orjson.

Run alone:  python -m tests.ollamaStub --port 11434 --models qwen2.5:7b,nomic-embed-text [--no-record]
In tests:   with StubServer(models=[...]) as stub: httpx.get(stub.baseUrl + "/api/tags")

Control API (not part of Ollama, exempt from the Host check):
  POST /_stub/pull {"name", "capabilities"?}   POST /_stub/remove {"name"}   POST /_stub/reset
  GET|POST /_stub/config {...}                 GET|DELETE /_stub/requests[?path=]   GET|DELETE /_stub/events
  GET /_stub/scheduler: loads, reloads, busy, pending and each runner's options, slots, refs, busy, waiting

Realistic by default, like the real daemon (reference ollama-api.md §12): tests/stubScheduler.py keeps each loaded
model's runner options and reloads it (loadDelayMs, default 25) on a difference, numParallel slots per runner
(default 1 = OLLAMA_NUM_PARALLEL; embedding models one), unbounded waiting for a loaded model, 503 only from the
load queue (maxQueue); tokensPerSecond paces replies (0 = chunkDelayMs); tests/stubRealism.py: silent prompt
truncation (recorded as "truncated" / "promptTruncated"), truncate:false, think, schemas, WebP, qwen2.5vl pixel
budgets and embedding truncation by `version` (default 0.33.0). KIND_SCHEDULER (--kind) is the old kind
stand-in: no slot limit, instant loads.

Magic markers in the last user message (or the generate prompt): [[midstream-error]], [[truncate]], [[busy]],
[[slow]], [[length]], [[loop]] (a repetition that runs to num_predict, or 10 x num_ctx capped at 4000 pieces).

Fault modes (POST /_stub/config, switchable while a service uses the stub; {"fault": null} clears, /_stub/reset too):
  fault          null | "busy" | "hang" | "slowFirstToken" | "midstreamError" | "truncate" | "malformedLine"
  faultPaths     Ollama paths the fault applies to (default /api/chat, /api/generate, /api/embed, /api/embeddings)
  faultCount     how many matching requests get the fault; -1 = until cleared (default; setting `fault` without
                 `faultCount` resets it to -1)
  faultDelayMs   the first-byte delay of "slowFirstToken" (default 2000)
  busy            503 {"error": "server busy, please try again.  maximum pending requests exceeded"}
  hang            reads the request and never answers, until the client goes away
  slowFirstToken  waits faultDelayMs before the first byte of the answer, then answers normally
  midstreamError  stream: 2 content lines, then an {"error": ...} line and the end (status 200);
                  stream:false and embed: 500 {"error": ...}
  truncate        stream: 2 content lines, then the connection is closed (no done line, no final chunk);
                  stream:false and embed: status, headers with the full Content-Length, half the body, closed
  malformedLine   stream: 1 good line, a line that is not JSON, then the rest; stream:false and embed: 200 with a
                  body that is not JSON
busy, hang and slowFirstToken hit every request on a fault path; the other three hit replies that pass validation
(a 400/404 is answered as usual and does not use up faultCount). Events: "fault" {fault, path} when a fault is
applied, "faultClientGone" {fault, path, afterMs} when the client of a hung or delayed request goes away.
"down" and "restart mid-load": StubServer.stop() cuts every open connection like a killed daemon (in-flight
requests fail, the port refuses connections) and restart(downtime) comes back on the same port; a stub run as a
process is killed and started again with the same --port.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import collections
import hashlib
import io
import ipaddress
import logging
import math
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from PIL import Image

from tests import stubRealism as realism
from tests.stubScheduler import Lease, Scheduler, versionTuple

STUB_VERSION = "0.33.0"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
DEFAULT_MODELS = (
    "qwen2.5:7b", "qwen2.5vl:7b", "granite3.2-vision:latest", "llama3.2-vision:latest", "llama4:scout",
    "deepseek-r1:70b", "qwen3:8b", "nomic-embed-text:latest",
)
RECORD_LIMIT = 1000
EVENT_LIMIT = 1000
BACKLOG = 4096
SLOW_MARKER_DELAY_S = 0.2
MARKER_CHUNKS = 2

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MIDSTREAM_ERROR = "an error was encountered while running the model: unexpected EOF"
ONE_IMAGE_MESSAGE = "this model only supports one image while more than one image requested"
INJECTED_MESSAGE = "stub injected failure"
MALFORMED_LINE = b'{"model": "stub", "message": {"role": "assistant", "content": oops this line is not JSON\n'
FAULTS = ("busy", "hang", "slowFirstToken", "midstreamError", "truncate", "malformedLine")
REQUEST_FAULTS = ("busy", "hang", "slowFirstToken")  # applied before the request is looked at
REPLY_FAULTS = ("midstreamError", "truncate", "malformedLine")  # applied to a reply that passed validation
CUT_LOG_MESSAGE = "ASGI callable returned without completing response."
REPLY_TEMPLATE = "This is a deterministic reply from the Ollama stub to: {prompt}"
THINKING_TEMPLATE = "The user asks about {prompt!r}. I should answer briefly and precisely."
TOOL_REPLY_PREFIX = "The tool returned: "
JSON_FORMAT_REPLY = {"answer": "stub"}
BAD_JSON_REPLY = "not json {"
PROMPT_ECHO_CHARS = 40
MARKERS = ("[[midstream-error]]", "[[truncate]]", "[[busy]]", "[[slow]]", "[[length]]", "[[loop]]")

WARM_LOAD_NS = 1_334_875
COLD_LOAD_NS = 250_000_000
PROMPT_NS_PER_WORD = 500_000
EVAL_NS_PER_CHUNK = 20_000_000
OVERHEAD_NS = 1_000_000
DEFAULT_KEEP_ALIVE_S = 300.0
FOREVER_EXPIRES_AT = "2318-08-01T00:00:00.000000000Z"
BASE_MODIFIED_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z; startup models are older than pulled ones

CLOUD_HOST = "https://ollama.com:443"
CLOUD_SIGNIN = "https://ollama.com/connect?name=stub&key=stub"
TOOL_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
GO_PRIVATE_NETS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
ALLOWED_HOST_SUFFIXES = (".localhost", ".local", ".internal")
MODEL_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")

JSON_TYPE = b"application/json; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"
TEXT_TYPE = b"text/plain; charset=utf-8"
BODY = "http.response.body"
NEWLINE = orjson.OPT_APPEND_NEWLINE
WORD_RE = re.compile(r"\S+\s*|\s+")
PARAM_RE = re.compile(r"(\d+(?:\.\d+)?)([bm])(?![a-z])")
DURATION_RE = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelRule:
    prefix: str
    capabilities: tuple[str, ...]
    family: str
    contextLength: int
    parameterSize: str
    imagesPerMessage: int = 0  # 0 = no limit
    embedDim: int = 4096


MODEL_RULES = (
    ModelRule("nomic-embed", ("embedding",), "nomic-bert", 2048, "137M", embedDim=768),
    ModelRule("qwen2.5vl", ("completion", "vision"), "qwen25vl", 128000, "8.3B", embedDim=3584),
    ModelRule("qwen2.5", ("completion", "tools"), "qwen2", 32768, "7.6B", embedDim=3584),
    ModelRule("qwen3-vl", ("completion", "vision", "tools", "thinking"), "qwen3vl", 262144, "8.8B"),
    ModelRule("qwen3", ("completion", "tools", "thinking"), "qwen3", 40960, "8.2B"),
    ModelRule("granite3.2-vision", ("completion", "vision", "tools"), "granite", 16384, "2.5B", embedDim=2048),
    ModelRule("llama3.2-vision", ("completion", "vision"), "mllama", 131072, "10.7B", imagesPerMessage=1),
    ModelRule("llama4", ("completion", "vision", "tools"), "llama4", 10485760, "108.6B", embedDim=5120),
    ModelRule("deepseek-r1", ("completion", "thinking"), "llama", 131072, "70.6B", embedDim=8192),
    ModelRule("gpt-oss", ("completion", "tools", "thinking"), "gptoss", 131072, "20.9B", embedDim=2880),
)
EMBED_RULE = ModelRule("", ("embedding",), "bert", 512, "335M", embedDim=1024)
DEFAULT_RULE = ModelRule("", ("completion", "tools"), "llama", 131072, "8.0B")


def normaliseName(name: str) -> str:
    """Lookup key of a model name: lower case, `:latest` added when there is no tag."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _findRule(base: str) -> ModelRule:
    for rule in MODEL_RULES:
        if base.startswith(rule.prefix):
            return rule
    return EMBED_RULE if "embed" in base or base.startswith(("all-minilm", "bge-")) else DEFAULT_RULE


def _parameterSize(tag: str, default: str) -> str:
    match = PARAM_RE.search(tag)
    return f"{match.group(1)}{match.group(2).upper()}" if match else default


def _parameterCount(size: str) -> int:
    scale = 1e9 if size.endswith("B") else 1e6
    return int(float(size[:-1]) * scale)


def _isCloudTag(tag: str) -> bool:
    return tag == "cloud" or tag.endswith("-cloud")


class StubModel:
    """One installed model: its catalogue facts and the precomputed `/api/tags` entry."""

    def __init__(self, name: str, modifiedNs: int, capabilities: list[str] | None = None) -> None:
        self.name = normaliseName(name)
        base, self.tag = self.name.rsplit(":", 1)
        self.base = base.rsplit("/", 1)[-1]
        rule = _findRule(self.base)
        self.capabilities = tuple(capabilities) if capabilities is not None else rule.capabilities
        self.family, self.contextLength = rule.family, rule.contextLength
        self.imagesPerMessage, self.embedDim = rule.imagesPerMessage, rule.embedDim
        self.parameterSize = _parameterSize(self.tag, rule.parameterSize)
        self.isCloud = _isCloudTag(self.tag)
        self.quantization = "F16" if "embedding" in self.capabilities else "Q4_K_M"
        self.size = 384 if self.isCloud else int(_parameterCount(self.parameterSize) * 0.6)
        self.digest = hashlib.sha256(self.name.encode()).hexdigest()
        self.modifiedNs = modifiedNs
        self.details = self._details()
        self.tagEntry = self._tagEntry()

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def remoteModel(self) -> str:
        tag = self.tag[: -len("-cloud")] if self.tag.endswith("-cloud") else ""
        return f"{self.base}:{tag}" if tag else self.base

    def _details(self) -> dict[str, Any]:
        return {"parent_model": "", "format": "" if self.isCloud else "gguf", "family": self.family,
                "families": [self.family], "parameter_size": self.parameterSize,
                "quantization_level": self.quantization}

    def _tagEntry(self) -> dict[str, Any]:
        entry = {"name": self.name, "model": self.name}
        if self.isCloud:
            entry.update(remote_model=self.remoteModel(), remote_host=CLOUD_HOST)
        entry.update(modified_at=_formatNs(self.modifiedNs), size=self.size, digest=self.digest,
                     details=self.details, capabilities=list(self.capabilities))
        return entry

    def showBody(self) -> dict[str, Any]:
        body = {"license": "", "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {self.name}\n",
                "parameters": 'stop                           "<|im_end|>"\ntemperature                    0.7',
                "template": "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}\n{{ end }}<|assistant|>",
                "details": self.details, "model_info": self._modelInfo(),
                "capabilities": list(self.capabilities), "modified_at": _formatNs(self.modifiedNs)}
        if self.isCloud:
            body.update(remote_model=self.remoteModel(), remote_host=CLOUD_HOST)
        return body

    def _modelInfo(self) -> dict[str, Any]:
        return {"general.architecture": self.family, "general.basename": self.base,
                "general.parameter_count": _parameterCount(self.parameterSize),
                f"{self.family}.context_length": self.contextLength,
                f"{self.family}.embedding_length": self.embedDim}


# -------------------------------------------------------------------------------------- config + state


KIND_SCHEDULER: dict[str, Any] = {"numParallel": 0, "loadDelayMs": 0}
"""The old kind stand-in: every request served at once, loads take no time. Only for tests and benchmarks that need
many paced streams at once (real Ollama queues them behind OLLAMA_NUM_PARALLEL slots)."""

CONFIG_DEFAULTS: dict[str, Any] = {
    "chunks": 8, "chunkDelayMs": 0, "replyText": None, "failNextStatus": 0, "failNextMessage": None,
    "failNextCount": 0, "failNextPaths": list(MODEL_PATHS), "badJsonCount": 0, "numParallel": 1, "maxQueue": 512,
    "loadDelayMs": 25, "slowLoadMs": 0, "contextLength": 0, "vramGiB": 24, "version": STUB_VERSION,
    "tokensPerSecond": 0,
    "splitWrites": False, "record": True,
    "fault": None, "faultPaths": list(MODEL_PATHS), "faultCount": -1, "faultDelayMs": 2000,
}
NUMBER = (int, float)
CONFIG_TYPES: dict[str, Any] = {
    "chunks": int, "chunkDelayMs": NUMBER, "replyText": (str, type(None)), "failNextStatus": int,
    "failNextMessage": (str, type(None)), "failNextCount": int, "failNextPaths": list, "badJsonCount": int,
    "numParallel": int, "maxQueue": int, "loadDelayMs": NUMBER, "slowLoadMs": NUMBER, "contextLength": int,
    "vramGiB": NUMBER, "version": str, "tokensPerSecond": NUMBER, "splitWrites": bool, "record": bool,
    "fault": (str, type(None)), "faultPaths": list, "faultCount": int, "faultDelayMs": NUMBER,
}


class StubConfig:
    """Behaviour switches; counters (failNextCount, badJsonCount) count down as they are used."""

    __slots__ = tuple(CONFIG_DEFAULTS)

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        for key, value in CONFIG_DEFAULTS.items():
            setattr(self, key, list(value) if isinstance(value, list) else value)
        self.update(values or {})

    def update(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            _checkConfigValue(key, value)
        for key, value in values.items():
            setattr(self, key, value)
        if "failNextStatus" in values and "failNextCount" not in values:
            self.failNextCount = 1 if values["failNextStatus"] else 0
        if "fault" in values and "faultCount" not in values:
            self.faultCount = -1

    def asDict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__slots__}


def _checkConfigValue(key: str, value: Any) -> None:
    expected = CONFIG_TYPES.get(key)
    if expected is None:
        raise ValueError(f"unknown config key {key!r}; known: {', '.join(CONFIG_TYPES)}")
    boolMismatch = isinstance(value, bool) and expected is not bool
    if boolMismatch or not isinstance(value, expected):
        raise ValueError(f"config key {key!r} has the wrong type: {type(value).__name__}")
    if key == "chunks" and value < 1:
        raise ValueError("chunks must be >= 1")
    if key == "fault" and value is not None and value not in FAULTS:
        raise ValueError(f"unknown fault {value!r}; known: {', '.join(FAULTS)}")
    if key == "faultDelayMs" and value < 0:
        raise ValueError("faultDelayMs must be >= 0")


class StubState:
    """Everything the stub app owns: models, behaviour config, recordings, events, loaded models, the queue."""

    def __init__(self, models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
                 config: dict[str, Any] | None = None) -> None:
        self.initialModels = tuple(models)
        self.initialConfig = dict(config or {})
        self.hostname = socket.gethostname().lower()
        self.hostCache: dict[bytes, bool] = {}
        self.scheduler = Scheduler(self)
        self.reset()

    def reset(self) -> None:
        self.config = StubConfig(self.initialConfig)
        self.models: dict[str, StubModel] = {}
        for index, name in enumerate(self.initialModels):
            self.addModel(name, BASE_MODIFIED_NS + index * 10**9)
        self.requests: collections.deque[dict] = collections.deque(maxlen=RECORD_LIMIT)
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENT_LIMIT)
        self.requestTotal = 0
        self.scheduler.reset()
        self.rng = random.Random(0)

    @property
    def version(self) -> tuple[int, int, int]:
        return versionTuple(self.config.version)

    def onRestart(self) -> None:
        """A restarted daemon has no model loaded and an empty queue; installed models and recordings stay."""
        self.scheduler.onRestart()

    def addModel(self, name: str, modifiedNs: int | None = None, capabilities: list[str] | None = None) -> StubModel:
        model = StubModel(name, modifiedNs or time.time_ns(), capabilities)
        self.models[model.name] = model
        return model

    def findModel(self, name: str) -> StubModel | None:
        return self.models.get(normaliseName(name))

    def addEvent(self, kind: str, **fields: Any) -> None:
        self.events.append({"type": kind, **fields, "at": time.monotonic()})

    def takeFault(self, path: str, kinds: tuple[str, ...]) -> str | None:
        """The configured fault when it is one of `kinds` and applies to `path` (uses up one of faultCount)."""
        config = self.config
        if config.fault not in kinds or path not in config.faultPaths or config.faultCount == 0:
            return None
        if config.faultCount > 0:
            config.faultCount -= 1
        self.addEvent("fault", fault=config.fault, path=path)
        return config.fault


def _keepAliveSeconds(value: Any) -> float:
    """Go-style keep_alive: seconds as a number, a duration string ("5m", "1h30m"); negative means forever."""
    if isinstance(value, bool):
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parseDuration(value)
    else:
        return DEFAULT_KEEP_ALIVE_S
    return math.inf if seconds < 0 else seconds


def _parseDuration(text: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = DURATION_RE.findall(text.strip())
    if not parts:
        try:
            return float(text)
        except ValueError:
            return DEFAULT_KEEP_ALIVE_S
    return sum(float(number) * units[unit] for number, unit in parts)


def _isZeroKeepAlive(value: Any) -> bool:
    return value is not None and not isinstance(value, bool) and _keepAliveSeconds(value) == 0


# ---------------------------------------------------------------------------------------- wire helpers


def _formatNs(ns: int) -> str:
    seconds, fraction = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%09dZ" % fraction


def _timestamp() -> str:
    return _formatNs(time.time_ns())


class Exchange:
    """One HTTP request/response: the ASGI triple, the raw body, its parsed JSON and the recording entry."""

    __slots__ = ("scope", "receive", "send", "state", "raw", "entry", "fault", "_json", "_jsonError")

    def __init__(self, scope: dict, receive: Any, send: Any, state: StubState, raw: bytes) -> None:
        self.scope, self.receive, self.send, self.state, self.raw = scope, receive, send, state, raw
        self.entry: dict | None = None
        self.fault: str | None = None
        self._json: Any = None
        self._jsonError: Exception | None = None
        if raw:
            try:
                self._json = orjson.loads(raw)
            except orjson.JSONDecodeError as error:
                self._jsonError = error

    @property
    def path(self) -> str:
        return self.scope["path"]


async def _sendBytes(ex: Exchange, status: int, body: bytes, contentType: bytes | None) -> None:
    if ex.entry is not None:
        ex.entry["status"] = status
    headers = [(b"content-length", b"%d" % len(body))]
    if contentType is not None:
        headers.append((b"content-type", contentType))
    await ex.send({"type": "http.response.start", "status": status, "headers": headers})
    await ex.send({"type": BODY, "body": body})


async def _sendJson(ex: Exchange, status: int, payload: Any) -> None:
    await _sendBytes(ex, status, orjson.dumps(payload), JSON_TYPE)


async def _sendError(ex: Exchange, status: int, message: str) -> None:
    await _sendBytes(ex, status, orjson.dumps({"error": message}), JSON_TYPE)


async def _startStream(ex: Exchange) -> None:
    if ex.entry is not None:
        ex.entry["status"] = 200
    await ex.send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON_TYPE)]})


async def _readBody(receive: Any) -> bytes | None:
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
    return b"".join(parts)


# -------------------------------------------------------------------------- Go-like request validation


def _jsonKind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "null")


FIELD_TYPES = {
    "ChatRequest": {"model": (str, "string"), "messages": (list, "[]api.Message"), "stream": (bool, "bool"),
                    "tools": (list, "api.Tools"), "options": (dict, "map[string]interface {}")},
    "GenerateRequest": {"model": (str, "string"), "prompt": (str, "string"), "system": (str, "string"),
                        "suffix": (str, "string"), "images": (list, "[]api.ImageData"), "stream": (bool, "bool"),
                        "raw": (bool, "bool"), "options": (dict, "map[string]interface {}")},
    "EmbedRequest": {"model": (str, "string"), "truncate": (bool, "bool"), "dimensions": (int, "int"),
                     "options": (dict, "map[string]interface {}")},
    "EmbeddingRequest": {"model": (str, "string"), "prompt": (str, "string")},
    "ShowRequest": {"model": (str, "string"), "name": (str, "string"), "verbose": (bool, "bool")},
}
MESSAGE_TYPES = {"role": (str, "string"), "content": (str, "string"), "thinking": (str, "string"),
                 "images": (list, "[]api.ImageData"), "tool_calls": (list, "[]api.ToolCall"),
                 "tool_name": (str, "string"), "tool_call_id": (str, "string")}
THINK_LEVELS = ("high", "medium", "low", "max")


def _typeError(kind: str, where: str, goType: str) -> str:
    return f"json: cannot unmarshal {kind} into Go struct field {where} of type {goType}"


def _checkFields(body: dict, spec: dict, where: str) -> str | None:
    for key, value in body.items():
        expected = spec.get(key)
        if expected is None or value is None:
            continue
        pyType, goType = expected
        if not isinstance(value, pyType) or (isinstance(value, bool) and pyType is not bool):
            return _typeError(_jsonKind(value), f"{where}.{key}", goType)
    return None


def _base64Error(text: str) -> str | None:
    try:
        binascii.a2b_base64(text, strict_mode=True)
        return None
    except binascii.Error:
        pass
    for index, char in enumerate(text):
        if char not in BASE64_CHARS and char not in "\r\n=":
            return f"illegal base64 data at input byte {index}"
    return f"illegal base64 data at input byte {len(text)}"


def _checkImages(images: list, where: str) -> str | None:
    for image in images:
        if not isinstance(image, str):
            return _typeError(_jsonKind(image), where, "api.ImageData")
        error = _base64Error(image)
        if error:
            return error
    return None


def _checkMessages(messages: list) -> str | None:
    for message in messages:
        if not isinstance(message, dict):
            return _typeError(_jsonKind(message), "ChatRequest.messages", "api.Message")
        error = _checkFields(message, MESSAGE_TYPES, "Message.messages")
        if error is None and message.get("images"):
            error = _checkImages(message["images"], "Message.messages.images")
        if error:
            return error
    return None


def _checkThink(body: dict) -> str | None:
    think = body.get("think")
    if think is None or isinstance(think, bool) or think in THINK_LEVELS:
        return None
    shown = orjson.dumps(think).decode()
    return f'invalid think value: {shown} (must be "high", "medium", "low", true, or false)'


def _validationError(body: dict, struct: str) -> str | None:
    error = _checkFields(body, FIELD_TYPES[struct], struct)
    if error is None and struct == "ChatRequest" and body.get("messages"):
        error = _checkMessages(body["messages"])
    if error is None and struct == "GenerateRequest" and body.get("images"):
        error = _checkImages(body["images"], "GenerateRequest.images")
    if error is None and struct in ("ChatRequest", "GenerateRequest"):
        error = _checkThink(body)
    return error


def _goJsonError(raw: bytes, error: orjson.JSONDecodeError) -> str:
    position = getattr(error, "pos", len(raw))
    if position >= len(raw.rstrip()):
        return "unexpected EOF"
    char = raw[position:position + 1].decode("latin-1")
    return f"invalid character {char!r} looking for beginning of value"


async def _requireJson(ex: Exchange, struct: str) -> dict | None:
    """The request body as a dict, or None after answering 400 the way Ollama's Go binding does."""
    if not ex.raw.strip():
        await _sendError(ex, 400, "missing request body")
        return None
    if ex._jsonError is not None:
        await _sendError(ex, 400, _goJsonError(ex.raw, ex._jsonError))
        return None
    body = ex._json
    if isinstance(body, dict):
        error = _validationError(body, struct)
    else:
        error = f"json: cannot unmarshal {_jsonKind(body)} into Go value of type api.{struct}"
    if error:
        await _sendError(ex, 400, error)
        return None
    return body


# -------------------------------------------------------------------------------------- reply planning


def _splitText(text: str, count: int) -> list[str]:
    """Split text into `count` pieces (fewer if it is shorter) whose concatenation is the text."""
    if count <= 1 or len(text) <= 1:
        return [text]
    words = WORD_RE.findall(text)
    if len(words) >= count:
        return ["".join(words[i * len(words) // count:(i + 1) * len(words) // count]) for i in range(count)]
    count = min(count, len(text))
    return [text[i * len(text) // count:(i + 1) * len(text) // count] for i in range(count)]


def _resolveRef(ref: str, root: dict) -> Any:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node


def _schemaInstance(schema: Any, root: dict | None = None, depth: int = 0) -> Any:
    """A minimal value satisfying a JSON schema: required properties only, "stub", 1, true, [] or enum[0]."""
    if not isinstance(schema, dict) or depth > 12:
        return "stub"
    root = root if root is not None else schema
    if "$ref" in schema:
        return _schemaInstance(_resolveRef(schema["$ref"], root), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _schemaInstance(schema[key][0], root, depth + 1)
    return _typedInstance(schema, _schemaType(schema), root, depth)


def _schemaType(schema: dict) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    return kind


def _typedInstance(schema: dict, kind: str, root: dict, depth: int) -> Any:
    if kind == "object":
        properties = schema.get("properties") or {}
        return {key: _schemaInstance(properties.get(key, {}), root, depth + 1) for key in schema.get("required") or []}
    if kind == "array":
        return [_schemaInstance(schema.get("items", {}), root, depth + 1) for _ in range(schema.get("minItems", 0))]
    if kind in ("integer", "number"):
        value = max(1, schema.get("minimum", 1))
        return int(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "stub".ljust(schema.get("minLength", 0), "!")


def _formatError(fmt: Any) -> str | None:
    if fmt is None or fmt == "" or fmt == "json" or isinstance(fmt, dict):
        return None
    raw = orjson.dumps(fmt).decode()
    return f'invalid format: {orjson.dumps(raw).decode()}; expected "json" or a valid JSON Schema object'


def _formatText(state: StubState, fmt: Any) -> str:
    if state.config.badJsonCount > 0:
        state.config.badJsonCount -= 1
        return BAD_JSON_REPLY
    instance = JSON_FORMAT_REPLY if fmt == "json" else _schemaInstance(fmt)
    return orjson.dumps(instance).decode()


def _toolCall(state: StubState, tool: Any) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    function = function if isinstance(function, dict) else {}
    arguments = _schemaInstance(function.get("parameters") or {"type": "object"})
    callId = "call_" + "".join(state.rng.choices(TOOL_ID_ALPHABET, k=8))
    return {"id": callId, "function": {"index": 0, "name": function.get("name", ""), "arguments": arguments}}


def _findMarker(prompt: str) -> str | None:
    if "[[" not in prompt:
        return None
    return next((marker for marker in MARKERS if marker in prompt), None)


def _wordCount(*texts: Any) -> int:
    return sum(len(text.split()) for text in texts if isinstance(text, str))


def _lastUserText(messages: list) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


class ReplyPlan:
    """What one chat/generate reply will emit: pieces (kind, value), how it ends, pacing and metrics inputs."""

    __slots__ = ("isChat", "modelName", "path", "createdAt", "pieces", "doneReason", "ending", "delay",
                 "loadDelay", "loadNs", "promptCount", "stream", "splitWrites", "malformed")

    def __init__(self, ex: Exchange, body: dict, isChat: bool) -> None:
        self.isChat, self.modelName, self.path = isChat, body["model"], ex.path
        self.createdAt = _timestamp()
        self.pieces: list[tuple[str, Any]] = []
        self.doneReason, self.ending = "stop", "done"
        config = ex.state.config  # tokensPerSecond (one piece = one token) paces like a GPU; else chunkDelayMs
        self.delay = 1.0 / config.tokensPerSecond if config.tokensPerSecond > 0 else config.chunkDelayMs / 1000.0
        self.loadDelay, self.loadNs, self.promptCount = 0.0, WARM_LOAD_NS, 0
        self.stream = body.get("stream") is not False
        self.splitWrites = ex.state.config.splitWrites
        self.malformed = False


def _planReply(ex: Exchange, body: dict, reply: dict[str, Any]) -> ReplyPlan:
    """reply: prompt, thinking (bool), tools (list|None), lastRole, lastContent, promptCount, isChat."""
    state = ex.state
    plan = ReplyPlan(ex, body, reply["isChat"])
    plan.promptCount = reply["promptCount"]
    prompt40 = reply["prompt"][:PROMPT_ECHO_CHARS]
    thought, style = THINKING_TEMPLATE.format(prompt=prompt40), reply["thinking"]
    if style == "split":
        plan.pieces.extend(("thinking", piece) for piece in _splitText(thought, 3))
    if reply["tools"] and reply["lastRole"] != "tool":
        plan.pieces.append(("tool_calls", [_toolCall(state, reply["tools"][0])]))
    else:
        text = _contentText(state, body, reply, prompt40)
        if style in ("inline", "leak"):  # realism.thinkingStyle: the reasoning lands in content
            text = ("<think>" if style == "inline" else "") + thought + "\n</think>\n\n" + text
        plan.pieces.extend(("content", piece) for piece in _splitText(text, state.config.chunks))
    marker = _findMarker(reply["prompt"])
    if marker == "[[loop]]":
        _applyLoop(plan, body.get("options"), reply["numCtx"])
    _applyMarker(plan, marker)
    _applyFault(plan, ex.fault)
    _applyNumPredict(plan, body.get("options"))
    return plan


def _applyLoop(plan: ReplyPlan, options: Any, numCtx: int) -> None:
    """[[loop]]: a repetition that only num_predict (or 10 x num_ctx) stops; done_reason "length"."""
    numPredict = options.get("num_predict") if isinstance(options, dict) else None
    count = min(realism.loopPieces(numPredict, numCtx), realism.LOOP_PIECES_CAP)
    plan.pieces = [piece for piece in plan.pieces if piece[0] == "thinking"] + [("content", "again ")] * count
    plan.doneReason = "length"


def _contentText(state: StubState, body: dict, reply: dict[str, Any], prompt40: str) -> str:
    if body.get("format"):
        return _formatText(state, body["format"])
    if reply["lastRole"] == "tool":
        return TOOL_REPLY_PREFIX + reply["lastContent"]
    if state.config.replyText is not None:
        return state.config.replyText
    return REPLY_TEMPLATE.format(prompt=prompt40)


def _applyMarker(plan: ReplyPlan, marker: str | None) -> None:
    if marker in ("[[midstream-error]]", "[[truncate]]"):
        _keepFirstChunks(plan)
        plan.ending = "error" if marker == "[[midstream-error]]" else "truncate"
    elif marker == "[[slow]]":
        plan.delay = SLOW_MARKER_DELAY_S
    elif marker == "[[length]]":
        plan.doneReason = "length"


def _keepFirstChunks(plan: ReplyPlan) -> None:
    thinking = [piece for piece in plan.pieces if piece[0] == "thinking"]
    others = [piece for piece in plan.pieces if piece[0] != "thinking"]
    plan.pieces = thinking + others[:MARKER_CHUNKS]


def _applyFault(plan: ReplyPlan, fault: str | None) -> None:
    """midstreamError and a streamed truncate shorten the reply; stream:false truncate is cut when sent."""
    if fault == "midstreamError" or (fault == "truncate" and plan.stream):
        _keepFirstChunks(plan)
        plan.ending = "error" if fault == "midstreamError" else "cut"
    elif fault == "malformedLine":
        plan.malformed = True


def _applyNumPredict(plan: ReplyPlan, options: Any) -> None:
    limit = options.get("num_predict") if isinstance(options, dict) else None
    if isinstance(limit, int) and 0 < limit < len(plan.pieces):
        plan.pieces = plan.pieces[:limit]
        plan.doneReason = "length"


# -------------------------------------------------------------------------------------- reply emission


def _metrics(plan: ReplyPlan) -> dict[str, int]:
    evalCount = len(plan.pieces)
    promptNs = max(1, plan.promptCount) * PROMPT_NS_PER_WORD
    evalNs = evalCount * (EVAL_NS_PER_CHUNK + int(plan.delay * 1e9)) or 1
    return {"total_duration": plan.loadNs + promptNs + evalNs + OVERHEAD_NS, "load_duration": plan.loadNs,
            "prompt_eval_count": plan.promptCount, "prompt_eval_duration": promptNs,
            "eval_count": evalCount, "eval_duration": evalNs}


def _chunkObject(plan: ReplyPlan, kind: str, value: Any) -> dict[str, Any]:
    text = value if kind == "content" else ""
    if plan.isChat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if kind != "content":
            message[kind] = value
        return {"model": plan.modelName, "created_at": plan.createdAt, "message": message, "done": False}
    chunk = {"model": plan.modelName, "created_at": plan.createdAt, "response": text, "done": False}
    if kind == "thinking":
        chunk["thinking"] = value
    return chunk


def _finalObject(plan: ReplyPlan) -> dict[str, Any]:
    final = _chunkObject(plan, "content", "")
    final["done"] = True
    final["done_reason"] = plan.doneReason
    final.update(_metrics(plan))
    return final


def _tailLine(plan: ReplyPlan) -> bytes:
    if plan.ending == "done":
        return orjson.dumps(_finalObject(plan), option=NEWLINE)
    if plan.ending == "error":
        return orjson.dumps({"error": MIDSTREAM_ERROR}, option=NEWLINE)
    return b""


def _mergedObject(plan: ReplyPlan) -> dict[str, Any]:
    """The stream:false body: concatenated content/thinking, merged tool_calls, final metrics."""
    byKind: dict[str, list] = {"content": [], "thinking": [], "tool_calls": []}
    for kind, value in plan.pieces:
        byKind[kind].append(value) if kind != "tool_calls" else byKind[kind].extend(value)
    merged = _chunkObject(plan, "content", "".join(byKind["content"]))
    target = merged["message"] if plan.isChat else merged
    if byKind["thinking"]:
        target["thinking"] = "".join(byKind["thinking"])
    if byKind["tool_calls"]:
        target["tool_calls"] = byKind["tool_calls"]
    if plan.ending == "done":
        merged.update(done=True, done_reason=plan.doneReason, **_metrics(plan))
    return merged


class StreamGuard:
    """Listens for `http.disconnect` concurrently so a paced reply stops as soon as the client leaves."""

    __slots__ = ("gone", "task")

    def __init__(self, receive: Any) -> None:
        loop = asyncio.get_running_loop()
        self.gone = loop.create_future()
        self.task = loop.create_task(self._listen(receive))

    async def _listen(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.gone.done():
                    self.gone.set_result(True)
                return

    async def pause(self, seconds: float) -> bool:
        """Wait up to `seconds`; False when the client disconnected."""
        if not self.gone.done() and seconds > 0:
            await asyncio.wait((self.gone,), timeout=seconds)
        return not self.gone.done()

    def close(self) -> None:
        self.task.cancel()


def _noteDisconnect(ex: Exchange, plan: ReplyPlan, afterChunks: int) -> None:
    ex.state.addEvent("disconnect", path=plan.path, model=plan.modelName, afterChunks=afterChunks)
    if ex.entry is not None:
        ex.entry["disconnected"] = True


async def _emit(ex: Exchange, plan: ReplyPlan) -> None:
    guard = StreamGuard(ex.receive) if plan.delay > 0 or plan.loadDelay > 0 else None
    try:
        if guard is not None and not await guard.pause(plan.loadDelay):
            _noteDisconnect(ex, plan, 0)
        elif plan.stream:
            await _emitStream(ex, plan, guard)
        else:
            await _emitWhole(ex, plan, guard)
    finally:
        if guard is not None:
            guard.close()


async def _emitStream(ex: Exchange, plan: ReplyPlan, guard: StreamGuard | None) -> None:
    lines = [orjson.dumps(_chunkObject(plan, kind, value), option=NEWLINE) for kind, value in plan.pieces]
    if plan.malformed:
        lines.insert(1, MALFORMED_LINE)
    await _startStream(ex)
    if guard is None and not plan.splitWrites:
        await _finishStream(ex, plan, b"".join(lines))
        return
    for sent, line in enumerate(lines):
        if guard is not None and not await guard.pause(plan.delay):
            _noteDisconnect(ex, plan, sent)
            return
        await ex.send({"type": BODY, "body": line, "more_body": True})
    await _finishStream(ex, plan, b"")


async def _finishStream(ex: Exchange, plan: ReplyPlan, body: bytes) -> None:
    if plan.ending != "cut":
        await ex.send({"type": BODY, "body": body + _tailLine(plan)})
    elif body:  # "cut": returning without the final chunk makes uvicorn close the connection
        await ex.send({"type": BODY, "body": body, "more_body": True})


async def _emitWhole(ex: Exchange, plan: ReplyPlan, guard: StreamGuard | None) -> None:
    if guard is not None:
        for produced in range(len(plan.pieces)):
            if not await guard.pause(plan.delay):
                _noteDisconnect(ex, plan, produced)
                return
    if plan.ending == "error":
        await _sendError(ex, 500, MIDSTREAM_ERROR)
    elif ex.fault in REPLY_FAULTS:
        await _sendFaultyWhole(ex, ex.fault, _mergedObject(plan))
    else:
        await _sendJson(ex, 200, _mergedObject(plan))


async def _sendFaultyWhole(ex: Exchange, fault: str, payload: Any) -> None:
    """A whole (non-streamed) reply spoiled by a reply fault."""
    if fault == "midstreamError":
        await _sendError(ex, 500, MIDSTREAM_ERROR)
    elif fault == "malformedLine":
        await _sendBytes(ex, 200, MALFORMED_LINE, JSON_TYPE)
    else:
        await _sendCut(ex, orjson.dumps(payload))


async def _sendCut(ex: Exchange, body: bytes) -> None:
    """Status and the full Content-Length, then half the body; returning early makes uvicorn close the connection."""
    if ex.entry is not None:
        ex.entry["status"] = 200
    headers = [(b"content-length", b"%d" % len(body)), (b"content-type", JSON_TYPE)]
    await ex.send({"type": "http.response.start", "status": 200, "headers": headers})
    await ex.send({"type": BODY, "body": body[:len(body) // 2], "more_body": True})


def _takeReplyFault(ex: Exchange) -> str | None:
    fault = ex.state.takeFault(ex.path, REPLY_FAULTS) if ex.state.config.fault else None
    if fault is not None:
        ex.fault = fault
        if ex.entry is not None:
            ex.entry["fault"] = fault
    return fault


# ------------------------------------------------------------------------------------- model endpoints


async def _resolveModel(ex: Exchange, body: dict, notFound: str) -> StubModel | None:
    name = body.get("model")
    if not name:
        await _sendError(ex, 400, "model is required")
        return None
    model = ex.state.findModel(name)
    if model is None:
        await _sendError(ex, 404, notFound.format(name=name))
    elif model.isCloud:
        ex.state.addEvent("cloud", path=ex.path, model=name)
        await _sendJson(ex, 401, {"error": "unauthorized", "signin_url": CLOUD_SIGNIN})
        return None
    return model


async def _rejectBusy(ex: Exchange, model: str) -> None:
    ex.state.addEvent("busy", path=ex.path, model=model)
    await _sendError(ex, 503, BUSY_MESSAGE)


def _keepAliveOf(body: dict) -> float:
    value = body.get("keep_alive")
    return DEFAULT_KEEP_ALIVE_S if value is None else _keepAliveSeconds(value)


async def _acquire(ex: Exchange, model: StubModel, body: dict) -> Lease | str:
    """A lease on the model's runner (loaded with the request's runner options); "busy" when the load queue is full,
    "gone" when the client left while its request was queued (Ollama drops it: 499 `request canceled`)."""
    scheduler = ex.state.scheduler
    lease = scheduler.tryAcquire(model, body.get("options"), _keepAliveOf(body))
    if lease is not None:
        return lease
    task = asyncio.ensure_future(scheduler.acquire(model, body.get("options"), _keepAliveOf(body)))
    guard = StreamGuard(ex.receive)
    try:
        await asyncio.wait((task, guard.gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        guard.close()
    if not task.done():
        task.cancel()
        try:
            late = await task
        except asyncio.CancelledError:
            late = None
        if late is not None:
            late.release()
        ex.state.addEvent("queuedClientGone", path=ex.path, model=body["model"])
        return "gone"
    return task.result() or "busy"


async def _loadOrUnload(ex: Exchange, body: dict, model: StubModel, isChat: bool) -> None:
    """Empty messages/prompt: warm-up (done_reason "load", loads with the request's runner options), or unload
    with keep_alive 0."""
    unload = _isZeroKeepAlive(body.get("keep_alive"))
    if unload:
        ex.state.scheduler.unload(model.name)
    else:
        lease = await _acquire(ex, model, body)
        if isinstance(lease, str):
            await (_rejectBusy(ex, body["model"]) if lease == "busy" else _noop())
            return
        lease.release()
    reason = "unload" if unload else "load"
    ex.state.addEvent(reason, path=ex.path, model=body["model"])
    reply = {"model": body["model"], "created_at": _timestamp()}
    reply.update({"message": {"role": "assistant", "content": ""}} if isChat else {"response": ""})
    reply.update(done=True, done_reason=reason)
    await _sendJson(ex, 200, reply)


def _serverError(ex: Exchange, body: dict, model: StubModel, images: list) -> str | None:
    """The daemon's 500s for requests it cannot run: a schema its grammar converter rejects (before v0.30), an image
    format the model's loader cannot decode (WebP, see realism.webpRefused)."""
    version = ex.state.config.version
    error = realism.schemaError(body.get("format"), version)
    if error is None and images and realism.webpRefused(model, version) and realism.hasWebp(images):
        error = realism.IMAGE_FAILED
    if error is not None:
        ex.state.addEvent("serverError", path=ex.path, model=body["model"], error=error)
    return error


def _capabilityError(body: dict, model: StubModel, verb: str, tools: Any) -> str | None:
    name = body["model"]
    if not model.supports("thinking") and body.get("think") not in (None, False):
        return f'"{name}" does not support thinking'
    if not model.supports("completion"):
        return f'"{name}" does not support {verb}'
    if tools and not model.supports("tools"):
        return f'"{name}" does not support tools'
    return None


def _tooManyImages(model: StubModel, imageLists: list) -> bool:
    limit = model.imagesPerMessage
    return limit > 0 and any(isinstance(images, list) and len(images) > limit for images in imageLists)


async def _noop() -> None:
    return None


async def _runReply(ex: Exchange, body: dict, model: StubModel, reply: dict[str, Any]) -> None:
    if _findMarker(reply["prompt"]) == "[[busy]]":
        await _rejectBusy(ex, body["model"])
        return
    lease = await _acquire(ex, model, body)
    if isinstance(lease, str):
        await (_rejectBusy(ex, body["model"]) if lease == "busy" else _noop())
        return
    try:
        error = _fitPrompt(ex, body, model, reply, lease.numCtx)
        if error is not None:
            await _sendError(ex, 400, error)
            return
        _takeReplyFault(ex)
        plan = _planReply(ex, body, reply)
        _applyLoad(plan, lease)
        await _emit(ex, plan)
    finally:
        lease.release()


def _fitPrompt(ex: Exchange, body: dict, model: StubModel, reply: dict[str, Any], numCtx: int) -> str | None:
    """The window check after the runner is chosen: truncate:false -> 400; otherwise the oldest messages are dropped
    (chat) or the prompt is cut (generate) silently, and the stub records it ("promptTruncated" event, entry)."""
    version = ex.state.config.version
    reply["numCtx"] = numCtx
    if reply["promptCount"] <= numCtx:
        return None
    if realism.truncateRefused(body, version):
        return realism.INPUT_TOO_LONG
    before = reply["promptCount"]
    kept, dropped = (realism.fitChat(model, body.get("messages") or [], numCtx, version) if reply["isChat"]
                     else (numCtx, 0))
    reply["promptCount"] = min(kept, numCtx)
    facts = {"promptTokens": before, "keptTokens": reply["promptCount"], "droppedMessages": dropped,
             "numCtx": numCtx}
    ex.state.addEvent("promptTruncated", path=ex.path, model=body["model"], **facts)
    if ex.entry is not None:
        ex.entry["truncated"] = facts
    return None


def _applyLoad(plan: ReplyPlan, lease: Lease) -> None:
    if lease.cold:
        plan.loadNs = int(lease.loadSeconds * 1e9) or COLD_LOAD_NS


async def handleChat(ex: Exchange) -> None:
    body = await _requireJson(ex, "ChatRequest")
    model = await _resolveModel(ex, body, "model '{name}' not found") if body is not None else None
    if model is None:
        return
    messages, tools = body.get("messages") or [], body.get("tools")
    error = _capabilityError(body, model, "chat", tools) or _formatError(body.get("format"))
    if error is None and _tooManyImages(model, [message.get("images") for message in messages]):
        error = ONE_IMAGE_MESSAGE
    images = [image for message in messages for image in message.get("images") or []]
    serverError = _serverError(ex, body, model, images)
    if error:
        await _sendError(ex, 400, error)
    elif serverError:
        await _sendError(ex, 500, serverError)
    elif not messages:
        await _loadOrUnload(ex, body, model, isChat=True)
    else:
        await _runReply(ex, body, model, _chatReply(body, model, messages, tools, ex.state.config.version))


def _chatReply(body: dict, model: StubModel, messages: list, tools: Any, version: str) -> dict[str, Any]:
    last = messages[-1]
    lastContent = last.get("content")
    return {"isChat": True, "prompt": _lastUserText(messages), "tools": tools or None,
            "thinking": realism.thinkingStyle(model, body.get("think"), version),
            "lastRole": last.get("role"), "lastContent": lastContent if isinstance(lastContent, str) else "",
            "promptCount": realism.chatTokens(model, messages, version)}


async def handleGenerate(ex: Exchange) -> None:
    body = await _requireJson(ex, "GenerateRequest")
    model = await _resolveModel(ex, body, "model '{name}' not found") if body is not None else None
    if model is None:
        return
    prompt = body.get("prompt") or ""
    error = _capabilityError(body, model, "generate", None) or _formatError(body.get("format"))
    if error is None and _tooManyImages(model, [body.get("images")]):
        error = ONE_IMAGE_MESSAGE
    serverError = _serverError(ex, body, model, body.get("images") or [])
    if error:
        await _sendError(ex, 400, error)
    elif serverError:
        await _sendError(ex, 500, serverError)
    elif not prompt and not body.get("images"):
        await _loadOrUnload(ex, body, model, isChat=False)
    else:
        reply = {"isChat": False, "prompt": prompt, "tools": None, "lastRole": "user", "lastContent": prompt,
                 "thinking": realism.thinkingStyle(model, body.get("think"), ex.state.config.version),
                 "promptCount": _wordCount(prompt, body.get("system")) + sum(
                     realism.imageTokens(model, image, ex.state.config.version) for image in body.get("images") or []
                     if isinstance(image, str))}
        await _runReply(ex, body, model, reply)


def _embedVector(model: StubModel, text: str, dimensions: Any) -> list[float]:
    size = model.embedDim
    if isinstance(dimensions, int) and 0 < dimensions < size:
        size = dimensions
    seed = int.from_bytes(hashlib.sha256(f"{model.name}\0{text}".encode()).digest()[:8], "big")
    generator = random.Random(seed)
    vector = [generator.random() - 0.5 for _ in range(size)]
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def _embedInputs(value: Any) -> list[str] | None:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


async def handleEmbed(ex: Exchange) -> None:
    body = await _requireJson(ex, "EmbedRequest")
    model = None if body is None else await _resolveModel(ex, body, 'model "{name}" not found, try pulling it first')
    if model is None:
        return
    inputs = _embedInputs(body.get("input"))
    if inputs is None:
        await _sendError(ex, 400, "invalid input type")
    elif not model.supports("embedding"):
        await _sendError(ex, 400, f'"{body["model"]}" does not support embeddings')
    else:
        lease = await _acquire(ex, model, body)
        if isinstance(lease, str):
            await (_rejectBusy(ex, body["model"]) if lease == "busy" else _noop())
            return
        lease.release()
        inputs = _fitEmbedInputs(ex, body, inputs, lease.numCtx)
        if inputs is None:
            await _sendError(ex, 400, realism.embedTooLongMessage(ex.state.config.version))
            return
        vectors = [_embedVector(model, text, body.get("dimensions")) for text in inputs]
        loadNs = COLD_LOAD_NS if lease.cold else WARM_LOAD_NS
        await _sendEmbedReply(ex, {"model": body["model"], "embeddings": vectors,
                                   "total_duration": loadNs + OVERHEAD_NS * (1 + len(inputs)),
                                   "load_duration": loadNs, "prompt_eval_count": _wordCount(*inputs)})


def _fitEmbedInputs(ex: Exchange, body: dict, inputs: list[str], numCtx: int) -> list[str] | None:
    """EmbedHandler: an input over the window is cut to it silently (truncate unset or true, every version), or the
    whole call is a 400 with truncate false. Cuts are recorded (event "embedTruncated", entry["truncatedInputs"])."""
    cut = [index for index, text in enumerate(inputs) if realism.wordTokens(text) > numCtx]
    if not cut:
        return inputs
    if body.get("truncate") is False:
        return None
    ex.state.addEvent("embedTruncated", path=ex.path, model=body["model"], inputs=cut, numCtx=numCtx)
    if ex.entry is not None:
        ex.entry["truncatedInputs"] = cut
    return [" ".join(text.split()[:numCtx]) if index in cut else text for index, text in enumerate(inputs)]


async def _sendEmbedReply(ex: Exchange, payload: dict[str, Any]) -> None:
    fault = _takeReplyFault(ex)
    if fault is None:
        await _sendJson(ex, 200, payload)
    else:
        await _sendFaultyWhole(ex, fault, payload)


async def handleEmbeddings(ex: Exchange) -> None:
    """Legacy /api/embeddings: one vector, not normalised."""
    body = await _requireJson(ex, "EmbeddingRequest")
    model = await _resolveModel(ex, body, "model '{name}' not found") if body is not None else None
    if model is None:
        return
    prompt = body.get("prompt") or ""
    lease = await _acquire(ex, model, body)
    if isinstance(lease, str):
        await (_rejectBusy(ex, body["model"]) if lease == "busy" else _noop())
        return
    lease.release()
    vector = [value * 3.0 for value in _embedVector(model, prompt, None)] if prompt else []
    await _sendEmbedReply(ex, {"embedding": vector})


async def handleShow(ex: Exchange) -> None:
    body = await _requireJson(ex, "ShowRequest")
    if body is None:
        return
    name = body.get("model") or body.get("name")
    if not name:
        await _sendError(ex, 400, "model is required")
        return
    model = ex.state.findModel(name)
    if model is None:
        await _sendError(ex, 404, f"model '{name}' not found")
    else:
        await _sendJson(ex, 200, model.showBody())


async def handleTags(ex: Exchange) -> None:
    models = sorted(ex.state.models.values(), key=lambda model: model.modifiedNs, reverse=True)
    await _sendJson(ex, 200, {"models": [model.tagEntry for model in models]})


async def handlePs(ex: Exchange) -> None:
    """PsHandler: each loaded runner with the context length it was loaded with."""
    state, now, wall = ex.state, time.monotonic(), time.time()
    running = []
    for name in list(state.scheduler.runners):
        runner, model = state.scheduler.live(name), state.models.get(name)
        if runner is None or model is None:
            continue
        expires = runner.expires if runner.refs == 0 else now + runner.keepAlive
        expiresAt = FOREVER_EXPIRES_AT if math.isinf(expires) else _formatNs(int((wall + expires - now) * 1e9))
        running.append({"name": model.name, "model": model.name, "size": model.size, "digest": model.digest,
                        "details": model.details, "expires_at": expiresAt, "size_vram": model.size,
                        "context_length": runner.numCtx})
    await _sendJson(ex, 200, {"models": running})


async def handleRoot(ex: Exchange) -> None:
    await _sendBytes(ex, 200, b"Ollama is running", TEXT_TYPE)


async def handleVersion(ex: Exchange) -> None:
    await _sendJson(ex, 200, {"version": ex.state.config.version})


ROUTES = {
    "/": {"GET": handleRoot, "HEAD": handleRoot},
    "/api/version": {"GET": handleVersion, "HEAD": handleVersion},
    "/api/tags": {"GET": handleTags, "HEAD": handleTags},
    "/api/ps": {"GET": handlePs},
    "/api/show": {"POST": handleShow},
    "/api/chat": {"POST": handleChat},
    "/api/generate": {"POST": handleGenerate},
    "/api/embed": {"POST": handleEmbed},
    "/api/embeddings": {"POST": handleEmbeddings},
}


# ------------------------------------------------------------------------------ Host check + recording


def _hostHeader(scope: dict) -> bytes:
    for name, value in scope["headers"]:
        if name == b"host":
            return value
    return b""


def _stripPort(host: str) -> str:
    """Like Go's net.SplitHostPort, falling back to the whole value when there is no port."""
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end != -1 and host[end + 1:end + 2] == ":" else host
    return host.split(":", 1)[0] if host.count(":") == 1 else host


def _hostAllowedUncached(raw: bytes, hostname: str) -> bool:
    host = _stripPort(raw.decode("latin-1").lower())
    if not host or host == "localhost" or host == hostname or host.endswith(ALLOWED_HOST_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or any(address in net for net in GO_PRIVATE_NETS
                                                                     if net.version == address.version)


def hostAllowed(state: StubState, raw: bytes) -> bool:
    """Ollama's allowedHostsMiddleware for a loopback bind (cached per Host value)."""
    allowed = state.hostCache.get(raw)
    if allowed is None:
        allowed = _hostAllowedUncached(raw, state.hostname)
        if len(state.hostCache) < 1024:
            state.hostCache[raw] = allowed
    return allowed


def _imageInfo(text: str, messageIndex: int | None, index: int) -> dict[str, Any]:
    info: dict[str, Any] = {"message": messageIndex, "index": index, "head": text[:16]}
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, TypeError) as error:
        info["error"] = f"base64: {error}"
        return info
    info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        with Image.open(io.BytesIO(data)) as image:
            info.update(width=image.width, height=image.height, format=image.format)
    except Exception as error:  # noqa: BLE001 - any undecodable payload is recorded, not raised
        info["error"] = f"image: {error}"
    return info


def _placeholder(text: Any) -> Any:
    return f"<base64 image: {len(text)} chars>" if isinstance(text, str) else text


def _recordImages(body: Any) -> tuple[Any, list[dict]]:
    """Image descriptions plus a copy of the body whose base64 strings are replaced by short placeholders."""
    if not isinstance(body, dict):
        return body, []
    infos: list[dict] = []
    copy = dict(body)
    if isinstance(body.get("images"), list):
        infos += [_imageInfo(text, None, i) for i, text in enumerate(body["images"]) if isinstance(text, str)]
        copy["images"] = [_placeholder(text) for text in body["images"]]
    if isinstance(body.get("messages"), list) and any(_hasImages(m) for m in body["messages"]):
        copy["messages"] = [_recordMessage(m, i, infos) for i, m in enumerate(body["messages"])]
    return (copy if infos else body), infos


def _hasImages(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("images"), list) and bool(message["images"])


def _recordMessage(message: Any, messageIndex: int, infos: list[dict]) -> Any:
    if not _hasImages(message):
        return message
    images = message["images"]
    infos += [_imageInfo(text, messageIndex, i) for i, text in enumerate(images) if isinstance(text, str)]
    return {**message, "images": [_placeholder(text) for text in images]}


def _recordRequest(ex: Exchange) -> dict[str, Any]:
    state, scope = ex.state, ex.scope
    state.requestTotal += 1
    headers: dict[str, str] = {}
    for rawName, rawValue in scope["headers"]:
        name, value = rawName.decode("latin-1"), rawValue.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if ex._jsonError is None:
        body, images = _recordImages(ex._json)
    else:
        body, images = ex.raw[:10000].decode("utf-8", "replace"), []
    entry = {"seq": state.requestTotal, "at": time.monotonic(), "method": scope["method"], "path": scope["path"],
             "query": scope["query_string"].decode("latin-1"), "headers": headers, "body": body,
             "images": images, "status": None}
    state.requests.append(entry)
    return entry


# ----------------------------------------------------------------------------------------- control API


async def _controlBody(ex: Exchange) -> dict | None:
    body = ex._json if ex.raw.strip() else {}
    if ex._jsonError is not None or not isinstance(body, dict):
        await _sendError(ex, 400, "control endpoints take a JSON object")
        return None
    return body


async def ctlPull(ex: Exchange) -> None:
    body = await _controlBody(ex)
    if body is None:
        return
    name = body.get("name") or body.get("model")
    if not isinstance(name, str) or not name:
        await _sendError(ex, 400, "name is required")
    else:
        model = ex.state.addModel(name, capabilities=body.get("capabilities"))
        await _sendJson(ex, 200, {"status": "success", "model": model.tagEntry})


async def ctlRemove(ex: Exchange) -> None:
    body = await _controlBody(ex)
    if body is None:
        return
    model = ex.state.models.pop(normaliseName(str(body.get("name") or body.get("model") or "")), None)
    ex.state.scheduler.runners.pop(model.name if model else "", None)
    if model is None:
        await _sendError(ex, 404, f"model '{body.get('name') or body.get('model')}' not found")
    else:
        await _sendJson(ex, 200, {"status": "success"})


async def ctlConfig(ex: Exchange) -> None:
    body = await _controlBody(ex)
    if body is None:
        return
    try:
        ex.state.config.update(body)
    except ValueError as error:
        await _sendError(ex, 400, str(error))
        return
    await _sendJson(ex, 200, ex.state.config.asDict())


async def ctlReset(ex: Exchange) -> None:
    ex.state.reset()
    await _sendJson(ex, 200, {"status": "success"})


def _queryValue(ex: Exchange, key: str) -> str | None:
    for part in ex.scope["query_string"].decode("latin-1").split("&"):
        name, _, value = part.partition("=")
        if name == key:
            return urllib.parse.unquote(value)
    return None


async def ctlRequests(ex: Exchange) -> None:
    if ex.scope["method"] == "DELETE":
        ex.state.requests.clear()
        await _sendJson(ex, 200, {"status": "success"})
        return
    path = _queryValue(ex, "path")
    requests = [entry for entry in ex.state.requests if path is None or entry["path"] == path]
    await _sendJson(ex, 200, {"count": len(requests), "total": ex.state.requestTotal, "requests": requests})


async def ctlScheduler(ex: Exchange) -> None:
    """Counters (loads, reloads, busy, pending) and each runner's options, references, busy slots and waiters."""
    scheduler = ex.state.scheduler
    runners = {name: {"options": runner.options, "slots": runner.slots, "refs": runner.refs, "busy": runner.busy,
                      "waiting": len(runner.slotWaiters)} for name, runner in scheduler.runners.items()}
    await _sendJson(ex, 200, {**scheduler.counters(), "runners": runners})


async def ctlEvents(ex: Exchange) -> None:
    if ex.scope["method"] == "DELETE":
        ex.state.events.clear()
        await _sendJson(ex, 200, {"status": "success"})
        return
    kind = _queryValue(ex, "type")
    events = [event for event in ex.state.events if kind is None or event["type"] == kind]
    await _sendJson(ex, 200, {"count": len(events), "events": events})


CONTROL_ROUTES = {
    "/_stub/pull": {"POST": ctlPull},
    "/_stub/remove": {"POST": ctlRemove},
    "/_stub/config": {"GET": ctlConfig, "POST": ctlConfig},
    "/_stub/reset": {"POST": ctlReset},
    "/_stub/requests": {"GET": ctlRequests, "DELETE": ctlRequests},
    "/_stub/events": {"GET": ctlEvents, "DELETE": ctlEvents},
    "/_stub/scheduler": {"GET": ctlScheduler},
}


# -------------------------------------------------------------------------------------------- ASGI app


class StubApp:
    """The ASGI application: Host check, recording, fault injection, then a dict lookup to the handler."""

    def __init__(self, state: StubState | None = None) -> None:
        self.state = state or StubState()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await _readBody(receive)
        if raw is None:
            return
        ex = Exchange(scope, receive, send, self.state, raw)
        path = scope["path"]
        if path.startswith("/_stub/"):
            await self._dispatch(ex, CONTROL_ROUTES.get(path))
            return
        if self.state.config.record:
            ex.entry = _recordRequest(ex)
        if not hostAllowed(self.state, _hostHeader(scope)):
            await _sendBytes(ex, 403, b"", None)
        elif self.state.config.failNextCount > 0 and path in self.state.config.failNextPaths:
            await self._injectFailure(ex)
        elif self.state.config.fault in REQUEST_FAULTS:
            await self._requestFault(ex)
        else:
            await self._dispatch(ex, ROUTES.get(path))

    async def _requestFault(self, ex: Exchange) -> None:
        fault = self.state.takeFault(ex.path, REQUEST_FAULTS)
        if fault is not None and ex.entry is not None:
            ex.entry["fault"] = fault
        if fault == "busy":
            await _sendError(ex, 503, BUSY_MESSAGE)
        elif fault == "hang":
            await _hangUntilClientGone(ex)
        elif fault == "slowFirstToken":
            await self._delayFirstByte(ex)
        else:
            await self._dispatch(ex, ROUTES.get(ex.path))

    async def _delayFirstByte(self, ex: Exchange) -> None:
        started, guard = time.monotonic(), StreamGuard(ex.receive)
        try:
            alive = await guard.pause(self.state.config.faultDelayMs / 1000.0)
        finally:
            guard.close()
        if alive:
            await self._dispatch(ex, ROUTES.get(ex.path))
        else:
            _noteClientGone(ex, "slowFirstToken", started)

    @staticmethod
    async def _dispatch(ex: Exchange, route: dict | None) -> None:
        if route is None:
            await _sendBytes(ex, 404, b"404 page not found", TEXT_TYPE)
            return
        handler = route.get(ex.scope["method"])
        if handler is None:
            await _sendBytes(ex, 405, b"405 method not allowed", TEXT_TYPE)
        else:
            await handler(ex)

    async def _injectFailure(self, ex: Exchange) -> None:
        config = self.state.config
        config.failNextCount -= 1
        status = config.failNextStatus or 500
        message = config.failNextMessage
        if message is None:
            message = BUSY_MESSAGE if status == 503 else INJECTED_MESSAGE
        self.state.addEvent("injected", path=ex.path, status=status)
        if message == "":
            await _sendBytes(ex, status, b"", None)
        else:
            await _sendError(ex, status, message)


async def _hangUntilClientGone(ex: Exchange) -> None:
    """The "hang" fault: the request was read; nothing is answered until the client closes the connection."""
    started = time.monotonic()
    while (await ex.receive())["type"] != "http.disconnect":
        pass
    _noteClientGone(ex, "hang", started)


def _noteClientGone(ex: Exchange, fault: str, started: float) -> None:
    ex.state.addEvent("faultClientGone", fault=fault, path=ex.path, afterMs=round((time.monotonic() - started) * 1000))
    if ex.entry is not None:
        ex.entry["disconnected"] = True


# --------------------------------------------------------------------------------------------- serving


class _QuietCut(logging.Filter):
    """Drops uvicorn's error line for a reply the stub cuts on purpose (the "truncate" fault)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != CUT_LOG_MESSAGE


logging.getLogger("uvicorn.error").addFilter(_QuietCut())


class StubUvicorn(uvicorn.Server):
    """uvicorn.Server that can cut every open connection at once, like a killed daemon."""

    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def abortConnections(self) -> None:
        """Runs on the server's loop: stop accepting, then abort every open connection (in flight or idle)."""
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()


def _checkLoopback(host: str) -> str:
    """The address to bind: loopback only (the stub must never listen on another address)."""
    if host == "localhost":
        return DEFAULT_HOST
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"the Ollama stub binds loopback addresses only, not {host!r}")


def bindSocket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def uvicornConfig(app: StubApp) -> uvicorn.Config:
    return uvicorn.Config(app, loop="uvloop", http="httptools", ws="none", lifespan="off", interface="asgi3",
                          access_log=False, server_header=False, log_config=None, log_level="warning",
                          backlog=BACKLOG, timeout_graceful_shutdown=1, timeout_keep_alive=30)


class ThreadedServer:
    """An ASGI app served by uvicorn on a background thread on a loopback address (a free port unless given);
    stop() cuts every open connection like a killed daemon, start() again keeps the port."""

    label = "server"

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.host = _checkLoopback(host)
        self.port = port
        self.app = app
        self._server: StubUvicorn | None = None
        self._thread: threading.Thread | None = None

    @property
    def baseUrl(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def url(self, path: str) -> str:
        return self.baseUrl + path

    def start(self, timeout: float = 10.0):  # noqa: ANN201 - returns the subclass
        if self.running:
            return self
        sock = bindSocket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = StubUvicorn(uvicornConfig(self.app))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"{self.label}-{self.port}", daemon=True)
        self._thread.start()
        self._waitStarted(timeout)
        return self

    def _waitStarted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} did not start on {self.baseUrl}")
            time.sleep(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop like a killed daemon: open connections (in-flight requests and idle keep-alive) are cut at once."""
        if self._server is None:
            return
        if self._server.loop is not None and not self._server.loop.is_closed():
            try:
                self._server.loop.call_soon_threadsafe(self._server.abortConnections)
            except RuntimeError:  # the loop closed in between
                pass
        self._server.should_exit = True
        self._thread.join(timeout / 2)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout / 2)
        self._server, self._thread = None, None

    def onRestart(self) -> None:
        """What a restarted process forgets (nothing here)."""

    def restart(self, downtime: float = 0.0):  # noqa: ANN201 - returns the subclass
        """Stop, optionally stay down for `downtime` seconds, start again on the SAME port."""
        self.stop()
        self.onRestart()
        if downtime:
            time.sleep(downtime)
        return self.start()

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StubServer(ThreadedServer):
    """The Ollama stub on a background thread: start() binds 127.0.0.1 (free port unless given) and waits until
    ready; restart() keeps the installed models and recordings, unloads models and empties the queue."""

    label = "ollama-stub"

    def __init__(self, models: tuple[str, ...] | list[str] = DEFAULT_MODELS, host: str = DEFAULT_HOST,
                 port: int = 0, record: bool = True, **config: Any) -> None:
        self.state = StubState(models, {"record": record, **config})
        super().__init__(StubApp(self.state), host, port)

    def onRestart(self) -> None:
        self.state.onRestart()


def parseArgs(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.ollamaStub", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--chunks", type=int, default=CONFIG_DEFAULTS["chunks"])
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--slow-load-ms", type=float, default=0.0)
    parser.add_argument("--num-parallel", "--max-parallel", type=int, default=CONFIG_DEFAULTS["numParallel"],
                        help="OLLAMA_NUM_PARALLEL: requests a loaded model serves at once (0 = unlimited)")
    parser.add_argument("--load-delay-ms", type=float, default=CONFIG_DEFAULTS["loadDelayMs"])
    parser.add_argument("--tokens-per-second", type=float, default=0.0,
                        help="pace every reply at this many pieces per second (overrides --chunk-delay-ms)")
    parser.add_argument("--kind", action="store_true",
                        help="the old kind stand-in: no slot limit, instant loads (overrides the two above)")
    parser.add_argument("--version", default=STUB_VERSION, help="the version /api/version reports")
    parser.add_argument("--max-queue", type=int, default=CONFIG_DEFAULTS["maxQueue"])
    parser.add_argument("--reply-text", default=None)
    parser.add_argument("--no-record", action="store_true", help="do not record requests (benchmarks)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parseArgs(argv)
    try:
        host = _checkLoopback(args.host)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    models = [name for name in args.models.split(",") if name.strip()]
    config = {"chunks": args.chunks, "chunkDelayMs": args.chunk_delay_ms, "slowLoadMs": args.slow_load_ms,
              "numParallel": args.num_parallel, "maxQueue": args.max_queue, "replyText": args.reply_text,
              "loadDelayMs": args.load_delay_ms, "version": args.version, "record": not args.no_record,
              "tokensPerSecond": args.tokens_per_second}
    if args.kind:
        config.update(KIND_SCHEDULER)
    state = StubState(models, config)
    sock = bindSocket(host, args.port)
    shownHost = f"[{host}]" if ":" in host else host
    print(f"Ollama stub listening on http://{shownHost}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicornConfig(StubApp(state))).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
