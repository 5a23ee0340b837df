"""Settings of the PowerOn private LLM service and MODEL_MAPPING, the one place where external model names resolve.

Settings come from an INI file (path in ``PRIVATE_LLM_CONFIG``, default ``./config.ini``); every key ``key`` of
section ``[section]`` is overridden by the environment variable ``PRIVATE_LLM_<SECTION>__<KEY>``.
``python config.py init`` writes a ``config.ini`` from ``config.ini.example`` with fresh random keys.
"""

from __future__ import annotations

import configparser
import hashlib
import ipaddress
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_PATH_ENV = "PRIVATE_LLM_CONFIG"
ENV_PREFIX = "PRIVATE_LLM_"
DEFAULT_CONFIG_PATH = "config.ini"
EXAMPLE_CONFIG_PATH = Path(__file__).with_name("config.ini.example")
PLACEHOLDER_MARKER = "CHANGE-ME"

ModelType = Literal["text", "vision", "reasoning", "embedding", "stt"]
MODEL_TYPES: tuple[str, ...] = ("text", "vision", "reasoning", "embedding", "stt")


class ConfigError(Exception):
    """A configuration problem an operator must fix before the service can start."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One external model name and what it resolves to."""

    externalName: str
    ollamaName: str
    """Ollama model name (``name:tag``); empty for models served by the whisper service."""
    type: ModelType
    purpose: str
    vramGb: float
    backend: Literal["ollama", "whisper"] = "ollama"
    maxImagePixels: int = 0
    """Pixel budget per image for vision models (0 = not a vision model)."""
    imagesPerMessage: int = 0
    """How many images one message may carry (0 = any number)."""


MODEL_MAPPING: Mapping[str, ModelSpec] = MappingProxyType({
    spec.externalName: spec
    for spec in (
        ModelSpec("poweron-text-general", "qwen2.5:7b", "text",
                  "General text: chat, summaries, neutralisation of personal data", 6.0),
        ModelSpec("poweron-vision-general", "qwen2.5vl:7b", "vision",
                  "Invoices, receipts, handwriting, screenshots (OCR and extraction)", 9.0,
                  maxImagePixels=2_097_152),
        ModelSpec("poweron-vision-deep", "granite3.2-vision", "vision",
                  "Document understanding: tables, charts, forms", 5.0,
                  maxImagePixels=1_500_000, imagesPerMessage=1),
        ModelSpec("poweron-text-reasoning", "deepseek-r1:70b", "reasoning",
                  "Multi-step reasoning, analysis of long documents (planned, RTX PRO 6000)", 45.0),
        ModelSpec("poweron-vision-multimodal", "llama4:scout", "vision",
                  "Multimodal analysis of several pages at once (planned, RTX PRO 6000)", 67.0,
                  maxImagePixels=1_254_400),
        ModelSpec("poweron-embed", "nomic-embed-text", "embedding",
                  "Embeddings for RAG (768 dimensions)", 0.5),
        ModelSpec("poweron-transcribe", "", "stt",
                  "Speech to text with faster-whisper large-v3-turbo (whisper service)", 6.0, backend="whisper"),
    )
})


MODEL_ALIASES: Mapping[str, str] = MappingProxyType({"whisper-1": "poweron-transcribe"})
"""Names clients send by convention (OpenAI's audio clients send whisper-1) and the external name they mean;
aliases are accepted but never listed in /v1/models."""


def _parseModelOverride(externalName: str, raw: str, base: ModelSpec | None) -> ModelSpec:
    """Parse one ``[models]`` entry: either just an Ollama name, or ``key=value; key=value`` pairs."""
    if "=" not in raw:
        if base is None:
            raise ConfigError(f"[models] {externalName}: a new model needs 'ollama=<name>; type=<type>'")
        return replace(base, ollamaName=raw.strip())
    fields: dict[str, str] = {}
    for part in raw.split(";"):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"[models] {externalName}: '{part.strip()}' is not key=value")
        fields[key.strip().lower()] = value.strip()
    return _specFromFields(externalName, fields, base)


def _specFromFields(externalName: str, fields: dict[str, str], base: ModelSpec | None) -> ModelSpec:
    modelType = fields.get("type", base.type if base else "")
    if modelType not in MODEL_TYPES:
        raise ConfigError(f"[models] {externalName}: type must be one of {', '.join(MODEL_TYPES)}")
    try:
        return ModelSpec(
            externalName=externalName,
            ollamaName=fields.get("ollama", base.ollamaName if base else ""),
            type=modelType,  # type: ignore[arg-type]
            purpose=fields.get("purpose", base.purpose if base else ""),
            vramGb=float(fields.get("vram_gb", base.vramGb if base else 0)),
            backend="whisper" if modelType == "stt" else "ollama",
            maxImagePixels=int(fields.get("max_image_pixels", base.maxImagePixels if base else 0)),
            imagesPerMessage=int(fields.get("images_per_message", base.imagesPerMessage if base else 0)),
        )
    except ValueError as exc:
        raise ConfigError(f"[models] {externalName}: {exc}") from None


def buildModelMapping(overrides: dict[str, str]) -> dict[str, ModelSpec]:
    """MODEL_MAPPING with the ``[models]`` overrides of config.ini applied."""
    mapping = dict(MODEL_MAPPING)
    for externalName, raw in overrides.items():
        mapping[externalName] = _parseModelOverride(externalName, raw, mapping.get(externalName))
    return mapping


def isCloudModelName(ollamaName: str) -> bool:
    """True for Ollama names served by ollama.com (tag ``cloud`` or ending in ``-cloud``)."""
    tag = ollamaName.rpartition(":")[2].lower() if ":" in ollamaName else ""
    return tag == "cloud" or tag.endswith("-cloud")


def parseNamedKeys(raw: str, setting: str) -> dict[str, str]:
    """Parse ``name=key, name2=key2`` into ``{name: key}``."""
    keys: dict[str, str] = {}
    for number, part in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not part:
            continue
        name, sep, key = part.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            which = f"'{name}'" if sep and name else f"number {number}"  # never echo what may be a key
            raise ConfigError(f"{setting}: entry {which} must look like name=<key>")
        if name in keys:
            raise ConfigError(f"{setting}: key name '{name}' appears twice")
        keys[name] = key
    return keys


PerKeyLimits = tuple[float | None, int | None, int | None]


def parsePerKeyLimits(raw: str, knownNames: set[str]) -> dict[str, PerKeyLimits]:
    """Parse ``[ratelimit] per_key``: ``name=<requests per minute>/<burst>/<concurrent>`` (trailing parts optional)."""
    limits: dict[str, PerKeyLimits] = {}
    for name, value in parseNamedKeys(raw, "[ratelimit] per_key").items():
        if name not in knownNames:
            raise ConfigError(f"[ratelimit] per_key: '{name}' is not a key name from [auth] api_keys or openai_keys")
        parts = [p.strip() for p in value.split("/")]
        try:
            rpm = float(parts[0]) if parts[0] else None
            burst, concurrent = (int(p) if p else None for p in (parts + ["", ""])[1:3])
        except ValueError:
            rpm = burst = concurrent = -1
        if len(parts) > 3 or any(v is not None and v <= 0 for v in (rpm, burst, concurrent)):
            raise ConfigError(f"[ratelimit] per_key: '{name}={value}' must be <requests per minute>/<burst>/"
                              "<concurrent> with positive numbers, e.g. kiva=1200/100/32")
        limits[name] = (rpm, burst, concurrent)
    return limits


LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7"))
"""Loopback and private (RFC 1918, IPv6 ULA) networks; ipaddress' is_private also counts documentation and
reserved ranges, which are not this operator's network."""


def isLocalUrl(url: str) -> bool:
    """True when the URL's host is loopback, a private (RFC 1918 / ULA) address, 0.0.0.0 or exactly localhost."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":  # not *.localhost: a resolver may send such names anywhere
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_unspecified or any(address in network for network in LOCAL_NETWORKS)


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


class OllamaSettings(Section):
    base_url: str = "http://127.0.0.1:11434"
    """URL of the local Ollama daemon."""
    connect_timeout: float = Field(3.0, gt=0)
    """Seconds to wait for a TCP connection to Ollama."""
    read_timeout: float = Field(600.0, gt=0)
    """Seconds to wait for the next bytes from Ollama (model loads can take minutes)."""
    keep_alive: str = "30m"
    """How long Ollama keeps a model loaded after a request (Ollama's keep_alive; a bare number means seconds)."""
    num_ctx: int = Field(8192, ge=0)
    """Context window sent as options.num_ctx (0 = Ollama's default)."""
    discovery_ttl: float = Field(10.0, gt=0)
    """Seconds between refreshes of the list of pulled models (/api/tags)."""
    max_connections: int = Field(256, ge=1)
    """Size of the connection pool to Ollama."""
    fast_transport: bool = True
    """Talk to a plain-http Ollama through the service's lean HTTP/1.1 transport (false: httpx's standard pool)."""

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


class LimitsSettings(Section):
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest request body accepted (checked from Content-Length and while reading)."""
    max_file_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    """Largest single uploaded file."""
    max_image_pixels: int = Field(50_000_000, ge=10_000)
    """Largest image (width x height) accepted before decoding; bigger ones are refused as pixel bombs."""


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
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: malformed ({str(exc).splitlines()[0]})") from None
    return {section.lower(): dict(parser.items(section)) for section in parser.sections()}


class Settings(BaseSettings):
    """All settings of the service; one section per concern."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
                                      case_sensitive=False, use_attribute_docstrings=True)

    server: ServerSettings = ServerSettings()
    """[server] section."""
    ollama: OllamaSettings = OllamaSettings()
    """[ollama] section."""
    auth: AuthSettings = AuthSettings()
    """[auth] section."""
    ratelimit: RateLimitSettings = RateLimitSettings()
    """[ratelimit] section."""
    limits: LimitsSettings = LimitsSettings()
    """[limits] section."""
    documents: DocumentSettings = DocumentSettings()
    """[documents] section."""
    whisper: WhisperSettings = WhisperSettings()
    """[whisper] section."""
    metrics: MetricsSettings = MetricsSettings()
    """[metrics] section."""
    warmup: WarmupSettings = WarmupSettings()
    """[warmup] section."""
    models: dict[str, str] = {}
    """[models] section: overrides or additions to MODEL_MAPPING."""

    _modelMapping: dict[str, ModelSpec] = PrivateAttr(default_factory=dict)
    _apiKeys: dict[str, str] = PrivateAttr(default_factory=dict)
    _openAiKeys: dict[str, str] = PrivateAttr(default_factory=dict)
    _perKeyLimits: dict[str, PerKeyLimits] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH))
        return init_settings, env_settings, IniSettingsSource(settings_cls, path)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self._modelMapping = buildModelMapping(self.models)
        self._apiKeys = parseNamedKeys(self.auth.api_keys, "[auth] api_keys")
        self._openAiKeys = parseNamedKeys(self.auth.openai_keys, "[auth] openai_keys")
        self._perKeyLimits = parsePerKeyLimits(self.ratelimit.per_key, set(self._apiKeys) | set(self._openAiKeys))
        return self

    @property
    def modelMapping(self) -> dict[str, ModelSpec]:
        return self._modelMapping

    @property
    def apiKeys(self) -> dict[str, str]:
        return self._apiKeys

    @property
    def openAiKeys(self) -> dict[str, str]:
        return self._openAiKeys

    @property
    def perKeyLimits(self) -> dict[str, PerKeyLimits]:
        """Per-key rate-limit overrides: name -> (requests per minute, burst, concurrent); None = class default."""
        return self._perKeyLimits

    @property
    def corsOrigins(self) -> list[str]:
        return [o.strip() for o in self.server.cors_origins.split(",") if o.strip()]

    @property
    def warmupModels(self) -> list[str]:
        return [m.strip() for m in self.warmup.models.split(",") if m.strip()]


def resolveModel(settings: Settings, externalName: str) -> ModelSpec | None:
    """The one place where an external model name resolves to its spec (None when unknown); MODEL_ALIASES apply
    only to names the mapping does not define itself."""
    spec = settings.modelMapping.get(externalName)
    if spec is None and externalName in MODEL_ALIASES:
        spec = settings.modelMapping.get(MODEL_ALIASES[externalName])
    return spec


MIN_KEY_CHARS = 16
SHA256_KEY_PREFIX = "sha256:"


def _checkKeyStrength(setting: str, name: str, key: str) -> None:
    if key.lower().startswith(SHA256_KEY_PREFIX):
        digest = key[len(SHA256_KEY_PREFIX):]
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ConfigError(f"{setting}: key '{name}' starts with sha256: but is not followed by 64 hex digits")
    elif len(key) < MIN_KEY_CHARS:
        raise ConfigError(f"{setting}: key '{name}' is shorter than {MIN_KEY_CHARS} characters; use a long random key "
                          "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")


def _keyDigestHex(key: str) -> str:
    if key.lower().startswith(SHA256_KEY_PREFIX):
        return key[len(SHA256_KEY_PREFIX):].lower()
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _checkKeyClassesDiffer(settings: Settings) -> None:
    openAiDigests = {_keyDigestHex(key): name for name, key in settings.openAiKeys.items()}
    for name, key in settings.apiKeys.items():
        if _keyDigestHex(key) in openAiDigests:
            raise ConfigError(f"[auth] analysis key '{name}' and OpenAI key '{openAiDigests[_keyDigestHex(key)]}' "
                              "are the same key; give each class its own keys")


def checkStartupSafety(settings: Settings) -> None:
    """Refuse to start with placeholder or missing keys, or upstream URLs that leave the machine."""
    for setting, keys in (("[auth] api_keys", settings.apiKeys), ("[auth] openai_keys", settings.openAiKeys)):
        envName = f"{ENV_PREFIX}AUTH__{setting.split()[1].upper()}"
        if not keys:
            raise ConfigError(f"{setting} is empty: set at least one name=<key> (or {envName})")
        for name, key in keys.items():
            if PLACEHOLDER_MARKER.lower() in key.lower():
                raise ConfigError(f"{setting}: key '{name}' is still the placeholder from config.ini.example; "
                                  f"fill in a real key (or set {envName})")
            _checkKeyStrength(setting, name, key)
    _checkKeyClassesDiffer(settings)
    if settings.server.allow_remote_upstream:
        return
    for setting, url in (("[ollama] base_url", settings.ollama.base_url),
                         ("[whisper] base_url", settings.whisper.base_url)):
        if not isLocalUrl(url):
            raise ConfigError(f"{setting} = {url} is not a loopback or private address; data must stay on this "
                              "server (set [server] allow_remote_upstream = true only if that host is yours)")


def _describeValidationError(exc: ValidationError) -> str:
    path = Path(os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH))
    first = exc.errors()[0]
    location = [str(part) for part in first["loc"]]
    where = f"[{location[0]}] {'.'.join(location[1:])}" if len(location) > 1 else location[0] if location else "?"
    envName = ENV_PREFIX + "__".join(part.upper() for part in location)
    return f"{path}: {where}: {first['msg']} (or environment variable {envName})"


def loadSettings(**overrides: Any) -> Settings:
    """Load and validate settings; raises ConfigError with one clear message naming the file and key."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describeValidationError(exc)) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    checkStartupSafety(settings)
    return settings


def writeInitialConfig(target: Path, example: Path = EXAMPLE_CONFIG_PATH) -> list[str]:
    """Copy config.ini.example to target with every placeholder replaced by a random key; returns the key names."""
    lines = example.read_text(encoding="utf-8").splitlines(keepends=True)
    filled: list[str] = []
    for index, line in enumerate(lines):
        while PLACEHOLDER_MARKER in line:
            start = line.index(PLACEHOLDER_MARKER)
            end = start + len(PLACEHOLDER_MARKER)
            while end < len(line) and (line[end].isalnum() or line[end] in "-_"):
                end += 1
            line = line[:start] + secrets.token_urlsafe(32) + line[end:]
            filled.append(line.split("=", 1)[0].strip())
        lines[index] = line
    target.write_text("".join(lines), encoding="utf-8")
    target.chmod(0o600)
    return filled


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"]:
        targetPath = Path(sys.argv[2] if len(sys.argv) > 2 else DEFAULT_CONFIG_PATH)
        if targetPath.exists():
            sys.exit(f"{targetPath} exists already; not overwritten")
        writeInitialConfig(targetPath)
        print(f"wrote {targetPath} with fresh random keys (read them there; they are not printed)")
    else:
        sys.exit("usage: python config.py init [path]")
