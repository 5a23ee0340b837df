"""The sections of config.ini as pydantic models (one class per [section], defaults and checks), and the INI source."""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from settings.parsing import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ServerSettings(Section):
    host: str = "127.0.0.1"
    """Address the main service binds to (put a TLS reverse proxy in front for public access)."""
    port: int = Field(8000, ge=1, le=65535)
    """TCP port of the main service."""
    log_level: str = "info"
    """Log level: debug, info, warning or error."""
    cors_origins: str = ""
    """Comma-separated origins allowed by CORS (e.g. https://cursor.com); empty = no CORS headers."""
    allow_remote_upstream: bool = False
    """Allow Ollama/whisper URLs that are not loopback or private addresses (off: refuse to start)."""
    graceful_shutdown_seconds: float = Field(30.0, ge=0)
    """On SIGTERM, how long running streams may take to finish before the process closes."""
    max_header_bytes: int = Field(64 * 1024, ge=4096)
    """Largest request line plus headers of one request; more is refused with 431 and the connection closed."""
    max_header_count: int = Field(100, ge=16)
    """Most header fields in one request; more is refused with 431."""
    header_timeout_seconds: float = Field(10.0, gt=0)
    """Time a client has to send a request's line and headers (from connecting, or from the first byte of a further
    request on a kept-alive connection); then 408 and the connection is closed (slowloris guard)."""
    body_timeout_seconds: float = Field(60.0, gt=0)
    """Longest pause between two reads of a request body (nginx's client_body_timeout), and the grace period before
    body_min_rate_bytes applies; then 408 and the connection is closed (slow-body guard)."""
    body_min_rate_bytes: int = Field(1024, ge=0)
    """Average bytes per second a request body must keep up after its first body_timeout_seconds (each further
    body_min_rate_bytes received buy one more second, as Apache's mod_reqtimeout MinRate); 0 = no rate check."""
    keep_alive_seconds: float = Field(5.0, gt=0)
    """How long an idle kept-alive connection stays open between requests."""
    max_connections: int = Field(1000, ge=1)
    """Open client connections at once; a connection beyond it gets 503 and is closed at once."""
    workers: int = Field(1, ge=1, le=64)
    """Processes serving the one port (more than 1 needs [state] redis_url, so limits are shared)."""


class OllamaSettings(Section):
    base_url: str = "http://127.0.0.1:11434"
    """URL of the local Ollama daemon (one upstream named "default"; ignored when upstreams is set)."""
    upstreams: str = ""
    """Several Ollama daemons: name=url, comma-separated (e.g. gpu1=http://10.0.0.5:11434); the names appear in
    logs, metrics and /health, the URLs never leave the server. Empty = base_url as the one upstream "default"."""
    drain: str = ""
    """Upstream names taking no new requests (running ones finish), comma-separated; reloaded on SIGHUP."""
    connect_timeout: float = Field(3.0, gt=0)
    """Seconds to wait for a TCP connection to Ollama."""
    read_timeout: float = Field(600.0, gt=0)
    """Seconds to wait for the next bytes from Ollama (model loads can take minutes)."""
    keep_alive: str = "30m"
    """How long Ollama keeps a model loaded after a request (Ollama's keep_alive; a bare number means seconds)."""
    num_ctx: int = Field(8192, ge=0)
    """Context window (options.num_ctx) of every model without its own num_ctx in [models]; the same for every
    route and the warm-up, capped at the model's context length (0 = Ollama's default, not recommended)."""
    num_predict: int = Field(2048, ge=1)
    """Default answer budget (options.num_predict) on /api/analyze and /api/text when maxTokens is not sent."""
    discovery_ttl: float = Field(10.0, gt=0)
    """Seconds between refreshes of the list of pulled models (/api/tags)."""
    max_connections: int = Field(256, ge=1)
    """Size of the connection pool to Ollama."""
    fast_transport: bool = True
    """Talk to a plain-http Ollama through the service's lean HTTP/1.1 transport (false: httpx's standard pool)."""
    num_parallel: int = Field(2, ge=1)
    """Requests Ollama runs at once per loaded model (its OLLAMA_NUM_PARALLEL); the service sends no more per model
    and queues the rest fairly across keys. Embedding models get 1 (Ollama loads them with one slot)."""
    num_parallel_per_model: str = ""
    """Per-model slots: name=<slots>, comma-separated; name is an external model name or an Ollama model name."""
    max_queue: int = Field(64, ge=0)
    """Requests per model waiting for a slot in the service before new ones get 503 with Retry-After."""
    max_queue_wait_seconds: float = Field(120.0, gt=0)
    """Longest wait for a slot; then 503 with Retry-After (a stream already showing its queue place gets an error
    event)."""
    queue_order: Literal["fair", "fifo"] = "fair"
    """fair: weighted fair queuing by key name ([ratelimit] queue_weights); fifo: first come, first served."""
    queue_notice_seconds: float = Field(3.0, gt=0)
    """How often a waiting stream gets an SSE comment ': queued, position N' (keeps proxies and clients patient)."""

    @field_validator("keep_alive")
    @classmethod
    def _keepAliveWithUnit(cls, value: str) -> str:
        """Ollama parses string durations with Go's ParseDuration, which needs a unit: ``-1`` becomes ``-1s``."""
        value = value.strip()
        try:
            float(value)
        except ValueError:
            return value
        return value + "s"


class AuthSettings(Section):
    api_keys: str = ""
    """Analysis API keys (header X-API-Key, /api/*): name=key, comma-separated; key may be sha256:<hex>."""
    openai_keys: str = ""
    """OpenAI-compatible API keys (Authorization: Bearer, /v1/*): name=key, comma-separated."""


class RateLimitSettings(Section):
    api_requests_per_minute: float = Field(120, gt=0)
    """Token refill rate for each analysis key."""
    api_burst: int = Field(20, ge=1)
    """Token bucket capacity for each analysis key."""
    openai_requests_per_minute: float = Field(600, gt=0)
    """Token refill rate for each OpenAI key."""
    openai_burst: int = Field(60, ge=1)
    """Token bucket capacity for each OpenAI key."""
    max_concurrent_per_key: int = Field(16, ge=1)
    """Requests one key may have in flight at once (streams included)."""
    per_key: str = ""
    """Per-key overrides: name=<requests per minute>/<burst>/<concurrent>, comma-separated."""
    queue_weights: str = ""
    """Share of the Ollama slots and render workers per key while keys wait: name=<weight>, comma-separated
    (e.g. cursor=4, gateway=1); keys not named weigh 1."""


class StateSettings(Section):
    redis_url: str = ""
    """Redis holding the shared limits of all instances (redis://127.0.0.1:6379/0); empty = in this process only."""
    failure_mode: Literal["fail_open", "fail_closed"] = "fail_open"
    """While Redis is unreachable: fail_open = per-instance limits as configured; fail_closed = each instance
    gets its share (limits divided by the instances alive at the last heartbeat), so all instances together stay
    within a key's limits."""
    instances: int = Field(2, ge=1, le=64)
    """Fallback for fail_closed: how many instances share the limits when no live count was ever seen (Redis down
    since the start); otherwise the instances alive at the last successful heartbeat divide the limits."""
    heartbeat_seconds: float = Field(5.0, ge=0.1, le=300)
    """Each instance announces itself in Redis this often; one that stops announcing (crashed, hung) counts as gone
    after 3 times this, one that shuts down at once. A reload (SIGHUP) applies a change at once."""
    lease_seconds: float = Field(30.0, ge=1, le=3600)
    """An in-flight slot held by an instance that stopped renewing it (crashed) is freed after this long."""
    timeout_seconds: float = Field(0.25, gt=0, le=10)
    """Longest wait for one Redis answer before Redis counts as unreachable."""


class LimitsSettings(Section):
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest request body accepted (checked from Content-Length and while reading)."""
    max_file_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    """Largest single uploaded file."""
    max_image_pixels: int = Field(50_000_000, ge=10_000)
    """Largest image (width x height) accepted before decoding; bigger ones are refused as pixel bombs."""
    max_request_pixels: int = Field(100_000_000, ge=10_000)
    """Most image pixels (all images of one /v1 chat request together); more is refused with 413."""
    max_messages: int = Field(10_000, ge=1)
    """Most messages (or Responses input items) in one /v1 chat request; more is refused with 413."""
    max_tools: int = Field(512, ge=1)
    """Most tools in one /v1 chat request; more is refused with 413."""
    max_json_items: int = Field(1_000_000, ge=1000)
    """Most items in a JSON body, counted by its commas before parsing; more is refused with 413."""
    max_json_depth: int = Field(128, ge=8, le=240)
    """Deepest nesting of objects and arrays in a JSON body; deeper is refused with 400."""
    worker_threads: int = Field(2, ge=1)
    """Threads that parse large JSON bodies and decode images off the event loop; at most this many such jobs run
    at once (the rest wait), which bounds their memory."""


class DocumentSettings(Section):
    max_pdf_pages: int = Field(5, ge=1)
    """Most PDF pages analysed per request."""
    default_pixel_budget: int = Field(2_097_152, ge=10_000)
    """Pixels per rendered page or image when the model has no budget of its own."""
    render_workers: int = Field(1, ge=1)
    """Processes rendering PDFs (PyMuPDF is not thread-safe)."""
    render_timeout_seconds: float = Field(60.0, gt=0)
    """Longest one document may take to render; the worker is then stopped and the request gets 422."""
    prestart_workers: bool = False
    """Start the render workers with the service (otherwise the first document waits about a second for them)."""


class WhisperSettings(Section):
    base_url: str = "http://127.0.0.1:9000"
    """URL of the whisper service as the main service calls it."""
    host: str = "127.0.0.1"
    """Address the whisper service binds to (loopback only unless allow_private_bind)."""
    allow_private_bind: bool = False
    """Allow a private (RFC 1918, fc00::/7) bind address for the keyless whisper service; off = loopback only."""
    port: int = Field(9000, ge=1, le=65535)
    """Port the whisper service listens on."""
    model: str = "large-v3-turbo"
    """faster-whisper model name or a local CTranslate2 model directory."""
    translation_model: str = ""
    """Model for /v1/audio/translations (turbo cannot translate); empty = same as model."""
    device: str = "auto"
    """cuda, cpu or auto."""
    compute_type: str = "default"
    """CTranslate2 compute type (float16 on GPU, int8 on CPU; default picks per device)."""
    vad: bool = True
    """Skip silence with the Silero VAD filter."""
    batched: bool = True
    """Use faster-whisper's BatchedInferencePipeline."""
    batch_size: int = Field(8, ge=1)
    """Batch size of the batched pipeline."""
    idle_unload_seconds: float = Field(900, ge=0)
    """Unload the model after this many idle seconds (0 = never)."""
    max_upload_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    """Largest audio upload."""
    max_concurrent: int = Field(1, ge=1)
    """Transcriptions running at once."""
    max_queue: int = Field(8, ge=0)
    """Transcriptions waiting for a slot before new ones get 503."""
    enabled: bool = True
    """Offer poweron-transcribe (the whisper service must answer its health check)."""
    cpu_threads: int = Field(0, ge=0)
    """CPU threads per transcription on cpu (0 = faster-whisper's default of 4)."""
    allow_download: bool = False
    """Allow fetching a model named by size (e.g. large-v3-turbo) from the Hugging Face Hub; off = local files only."""
    max_audio_seconds: float = Field(7200, gt=0)
    """Longest decoded audio accepted (decoded audio costs about 230 MB of RAM per hour)."""
    request_timeout: float = Field(1800, gt=0)
    """Seconds the main service waits for the whisper service's answer (or the next stream event)."""


class MetricsSettings(Section):
    enabled: bool = True
    """Serve Prometheus metrics at /metrics (requires an analysis or OpenAI key)."""


class WarmupSettings(Section):
    models: str = "poweron-text-general"
    """External model names preloaded at start and after Ollama restarts, comma-separated."""


class IniSettingsSource(PydanticBaseSettingsSource):
    """Reads the INI file named by PRIVATE_LLM_CONFIG (default ./config.ini)."""

    def __init__(self, settingsCls: type[BaseSettings], path: Path) -> None:
        super().__init__(settingsCls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return readIniFile(self.path)


def readIniFile(path: Path) -> dict[str, Any]:
    """The INI file as nested dicts; ConfigError naming the file when it is missing or malformed."""
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found (copy config.ini.example or run 'make config.ini')")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    raw = path.read_bytes()
    try:
        parser.read_string(raw.decode("utf-8"), source=str(path))
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: malformed: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    except configparser.Error as exc:
        raise ConfigError(describeIniError(path, exc)) from None
    return {section.lower(): dict(parser.items(section)) for section in parser.sections()}


def describeIniError(path: Path, exc: configparser.Error) -> str:
    """configparser's error as '<file>, line <n>: malformed: <what>' (its own text puts the line on a second line)."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return (f"{path}, line {exc.lineno}: malformed: no section header before {exc.line.strip()[:60]!r} "
                "(settings follow a [section] line)")
    if isinstance(exc, configparser.ParsingError) and exc.errors:
        line, text = exc.errors[0]
        return f"{path}, line {line}: malformed: {text.strip()[:60]!r} is not 'key = value', a [section] or a comment"
    if isinstance(exc, configparser.DuplicateSectionError | configparser.DuplicateOptionError) and exc.lineno:
        return f"{path}, line {exc.lineno}: malformed: {str(exc).split(']: ', 1)[-1]}"
    return f"{path}: malformed: {str(exc).splitlines()[0]}"
