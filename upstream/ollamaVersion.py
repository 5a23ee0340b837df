"""What the Ollama daemon can do, by the version it reports (``GET /api/version``).

Servers are installed with Ollama's install script (newest release) and not always upgraded together, so every
version-dependent behaviour the service relies on is decided here, from the source of each release
(shared/reference/ollama-api.md §12):

- ``truncate: false`` on /api/chat and /api/generate (refuse instead of dropping the oldest messages): from
  v0.12.6 (commit 6544e1473, "add truncate and shift parameters").
- ``think`` on by default for thinking models: from v0.12.4 (commit 90d429f5a); before it a thinking model
  without an explicit ``think`` writes ``<think>...</think>`` into ``content``.
- JSON-schema ``format`` through llama.cpp's json-schema-to-grammar: the same converter before v0.30 (CGO
  ``SchemaToGrammar``, 500 ``invalid JSON schema in format``) and from v0.30 (llama-server's ``json_schema``);
  upstream/schemaGrammar.py checks schemas against it for every version.
- WebP: granite3.2-vision on v0.12 (llama.cpp loader) and every model from v0.30 to v0.32.13 cannot decode it
  (transcoded from v0.32.14, commit f427fa075); the service sends PNG or JPEG only, whatever the version.
- Default ``num_ctx`` when none is sent: 4096 before v0.20 (envconfig), by VRAM from v0.20 (<24 GiB 4k,
  24-48 GiB 32k, >=48 GiB 256k); the service always sends one.
"""

from __future__ import annotations

from dataclasses import dataclass

Version = tuple[int, int, int]
UNKNOWN_VERSION: Version = (0, 0, 0)
TRUNCATE_FLAG_SINCE: Version = (0, 12, 6)
THINK_DEFAULT_SINCE: Version = (0, 12, 4)
LLAMA_SERVER_SINCE: Version = (0, 30, 0)
WEBP_TRANSCODED_SINCE: Version = (0, 32, 14)
VRAM_CONTEXT_SINCE: Version = (0, 20, 0)
OLD_DEFAULT_CONTEXT = 4096


def parseVersion(text: str | None) -> Version:
    """"0.12.4" -> (0, 12, 4); "v0.33.0-rc2" -> (0, 33, 0); empty or junk -> (0, 0, 0) (unknown)."""
    parts: list[int] = []
    for part in str(text or "").strip().lstrip("v").split("-", 1)[0].split(".")[:3]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits) if digits else 0)
    parts += [0] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class OllamaFeatures:
    """The behaviours of one daemon version; an unknown version (0.0.0) is treated as the oldest."""

    version: Version

    @classmethod
    def of(cls, text: str | None) -> OllamaFeatures:
        return cls(parseVersion(text))

    @property
    def truncateFlag(self) -> bool:
        """/api/chat and /api/generate take ``truncate: false`` (400 instead of a silent cut)."""
        return self.version >= TRUNCATE_FLAG_SINCE

    @property
    def thinksByDefault(self) -> bool:
        return self.version >= THINK_DEFAULT_SINCE

    @property
    def decodesWebp(self) -> bool:
        """True only where every model can take WebP; the service converts WebP anyway."""
        return self.version >= WEBP_TRANSCODED_SINCE

    @property
    def label(self) -> str:
        return "unknown" if self.version == UNKNOWN_VERSION else ".".join(map(str, self.version))


QWEN25VL_NEW_BUDGET_SINCE: Version = (0, 13, 4)
QWEN25VL_OLD_PIXELS = 28 * 28 * 1280
"""qwen2.5vl's downscale target up to v0.13.3 (model/models/qwen25vl/process_image.go `vision.max_pixels`)."""


def isQwen25vl(ollamaName: str) -> bool:
    return ollamaName.lower().rsplit("/", 1)[-1].startswith("qwen2.5vl")


def qwenKeptPixels(features: OllamaFeatures) -> int:
    """The pixels qwen2.5vl keeps of any image on this daemon version (its downscale target)."""
    return QWEN25VL_OLD_PIXELS if features.version < QWEN25VL_NEW_BUDGET_SINCE else 2 << 20


def imagePixelBudget(configured: int, ollamaName: str, features: OllamaFeatures) -> int:
    """Pixels per image worth sending: the configured budget, lowered to what the daemon keeps (qwen2.5vl before
    v0.13.4 downscales to 1,003,520 px, so rendering more only costs time and an overestimated token count)."""
    if configured and isQwen25vl(ollamaName) and features.version < QWEN25VL_NEW_BUDGET_SINCE:
        return min(configured, QWEN25VL_OLD_PIXELS)
    return configured
