"""Settings of the PowerOn private LLM service and MODEL_MAPPING, the one place where external model names resolve.

Settings come from an INI file (path in ``PRIVATE_LLM_CONFIG``, default ``./config.ini``); every key ``key`` of
section ``[section]`` is overridden by the environment variable ``PRIVATE_LLM_<SECTION>__<KEY>``.
``python config.py init`` writes a ``config.ini`` from ``config.ini.example`` with fresh random keys.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from settings.parsing import ConfigError, PerKeyLimits, checkSharedState, isLocalUrl, parseDrain, parseNamedKeys
from settings.parsing import parsePerKeyLimits, parsePositiveNumbers, parseUpstreams
from settings.parsing import isCloudModelName as isCloudModelName
from settings.sections import (
    AuthSettings,
    DocumentSettings,
    IniSettingsSource,
    LimitsSettings,
    MetricsSettings,
    OllamaSettings,
    RateLimitSettings,
    ServerSettings,
    StateSettings,
    WarmupSettings,
    WhisperSettings,
)

CONFIG_PATH_ENV = "PRIVATE_LLM_CONFIG"


ENV_PREFIX = "PRIVATE_LLM_"


DEFAULT_CONFIG_PATH = "config.ini"


EXAMPLE_CONFIG_PATH = Path(__file__).with_name("config.ini.example")


PLACEHOLDER_MARKER = "CHANGE-ME"


ModelType = Literal["text", "vision", "reasoning", "embedding", "stt"]


MODEL_TYPES: tuple[str, ...] = ("text", "vision", "reasoning", "embedding", "stt")


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
    numCtx: int = 0
    """Context window (options.num_ctx) for every request and the warm-up of this model (0 = [ollama] num_ctx);
    capped at the model's own context length from /api/show."""
    numPredict: int = 0
    """Default answer budget (options.num_predict) on /api/analyze and /api/text (0 = [ollama] num_predict)."""


MODEL_MAPPING: Mapping[str, ModelSpec] = MappingProxyType({
    spec.externalName: spec
    for spec in (
        ModelSpec("poweron-text-general", "qwen2.5:7b", "text",
                  "General text: chat, summaries, neutralisation of personal data", 6.0),
        # qwen2.5vl: Ollama downscales every image to 2<<20 px from v0.13.4 (model/models/qwen25vl/process_image.go,
        # commit 971d62595: `vision.max_pixels` default) and to 28*28*1280 = 1,003,520 px up to v0.13.3;
        # upstream/ollamaVersion.imagePixelBudget picks the number by the daemon's version (this is the newer one;
        # from v0.30 the model runs on llama-server, whose limit is not read from source here)
        ModelSpec("poweron-vision-general", "qwen2.5vl:7b", "vision",
                  "Invoices, receipts, handwriting, screenshots (OCR and extraction)", 9.0,
                  maxImagePixels=2_097_152),
        # granite3.2-vision: a budget of this service (not from Ollama's source); one image per message
        ModelSpec("poweron-vision-deep", "granite3.2-vision", "vision",
                  "Document understanding: tables, charts, forms", 5.0,
                  maxImagePixels=1_500_000, imagesPerMessage=1),
        ModelSpec("poweron-text-reasoning", "deepseek-r1:70b", "reasoning",
                  "Multi-step reasoning, analysis of long documents (planned, RTX PRO 6000)", 45.0),
        # llama4: 1120 x 1120 px, a budget of this service (Ollama's llama4 processor tiles larger images itself)
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
            numCtx=int(fields.get("num_ctx", base.numCtx if base else 0)),
            numPredict=int(fields.get("num_predict", base.numPredict if base else 0)),
        )
    except ValueError as exc:
        raise ConfigError(f"[models] {externalName}: {exc}") from None


def buildModelMapping(overrides: dict[str, str]) -> dict[str, ModelSpec]:
    """MODEL_MAPPING with the ``[models]`` overrides of config.ini applied."""
    mapping = dict(MODEL_MAPPING)
    for externalName, raw in overrides.items():
        mapping[externalName] = _parseModelOverride(externalName, raw, mapping.get(externalName))
    return mapping


def _slotsByOllamaName(mapping: dict[str, ModelSpec], slots: dict[str, float]) -> dict[str, int]:
    """Per-model slot overrides keyed by the Ollama model name; an external name stands for its Ollama model."""
    return {(mapping[name].ollamaName if name in mapping else name): int(count) for name, count in slots.items()}


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
    state: StateSettings = StateSettings()
    """[state] section."""
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
    _queueWeights: dict[str, float] = PrivateAttr(default_factory=dict)
    _slotsPerModel: dict[str, int] = PrivateAttr(default_factory=dict)
    _upstreams: dict[str, str] = PrivateAttr(default_factory=dict)
    _drain: frozenset[str] = PrivateAttr(default_factory=frozenset)

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
        self._queueWeights = parsePositiveNumbers(self.ratelimit.queue_weights, "[ratelimit] queue_weights",
                                                  set(self._apiKeys) | set(self._openAiKeys), integer=False)
        self._slotsPerModel = _slotsByOllamaName(self._modelMapping, parsePositiveNumbers(
            self.ollama.num_parallel_per_model, "[ollama] num_parallel_per_model", None, integer=True))
        self._upstreams = parseUpstreams(self.ollama.upstreams, self.ollama.base_url)
        self._drain = parseDrain(self.ollama.drain, self._upstreams)
        return self

    upstreams = property(lambda self: self._upstreams, doc="Ollama upstreams by name ({'default': base_url} alone)")
    drainingUpstreams = property(lambda self: self._drain, doc="[ollama] drain: upstream names taking no new requests")

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
    def queueWeights(self) -> dict[str, float]:
        """[ratelimit] queue_weights: key name -> weight in the fair queues (keys not named weigh 1)."""
        return self._queueWeights

    @property
    def slotsPerModel(self) -> dict[str, int]:
        """[ollama] num_parallel_per_model by Ollama model name (external names resolved through the mapping)."""
        return self._slotsPerModel

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
    checkSharedState(settings.server.workers, settings.state.redis_url, settings.server.allow_remote_upstream)
    if settings.server.allow_remote_upstream:
        return
    ollamaUrls = [(f"[ollama] upstreams: {name}" if settings.ollama.upstreams.strip() else "[ollama] base_url", url)
                  for name, url in settings.upstreams.items()]
    for setting, url in (*ollamaUrls, ("[whisper] base_url", settings.whisper.base_url)):
        if not isLocalUrl(url):
            raise ConfigError(f"{setting} = {url} is not a loopback or private address; data must stay on this "
                              "server (set [server] allow_remote_upstream = true only if that host is yours)")


def settingSource(section: str, key: str) -> str:
    """Where [section] key comes from: the environment variable that overrides it (systemd sets them from
    secrets.env), else the INI file."""
    envName = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
    if any(name.upper() == envName for name in os.environ):
        return f"environment variable {envName} (from the service's environment, e.g. secrets.env)"
    return str(Path(os.environ.get(CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH)))


def _describeValidationError(exc: ValidationError) -> str:
    first = exc.errors()[0]
    location = [str(part) for part in first["loc"]]
    if len(location) < 2:
        return f"{settingSource('?', '?') if not location else location[0]}: {first['msg']}"
    envName = ENV_PREFIX + "__".join(part.upper() for part in location)
    source = settingSource(location[0], location[1])
    alternative = "" if source.startswith("environment") else f" (or environment variable {envName})"
    return f"{source}: [{location[0]}] {'.'.join(location[1:])}: {first['msg']}{alternative}"


def _withSource(message: str) -> str:
    """A check's message ('[section] key: ...') prefixed by where that setting came from."""
    named = re.match(r"\[(\w+)\] ([\w-]+)", message)
    return f"{settingSource(named.group(1), named.group(2))}: {message}" if named else message


def loadSettings(**overrides: Any) -> Settings:
    """Load and validate settings; raises ConfigError with one clear message naming the key and where it came from
    (the INI file, with the line for a malformed one, or the environment variable)."""
    try:
        settings = Settings(**overrides)
        checkStartupSafety(settings)
    except ValidationError as exc:
        raise ConfigError(_describeValidationError(exc)) from None
    except ConfigError as exc:
        raise ConfigError(_withSource(str(exc))) from None
    except ValueError as exc:
        raise ConfigError(_withSource(str(exc))) from None
    return settings


def writeInitialConfig(target: Path, example: Path = EXAMPLE_CONFIG_PATH) -> list[str]:
    """Copy config.ini.example to target with every placeholder replaced by a random key; returns the key names."""
    lines = example.read_text(encoding="utf-8").splitlines(keepends=True)
    filled: list[str] = []
    for index, line in enumerate(lines):
        while PLACEHOLDER_MARKER in line and not line.lstrip().startswith((";", "#")):
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
