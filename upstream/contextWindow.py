"""One context window per model, and the prompt-size check that keeps Ollama from cutting prompts silently.

Ollama keeps a loaded model's runner options (num_ctx among them) and reloads the model for a request whose
options differ (server/sched.go needsReload), waiting for every request in flight on it. So every route and the
warm-up send the same ``num_ctx`` for a model: ``num_ctx`` of its MODEL_MAPPING / ``[models]`` entry, else
``[ollama] num_ctx``, capped at the model's own context length from /api/show (Ollama caps it the same way, and
vision models get at least 2048, as in sched.go getRunner).

A prompt longer than that window is cut silently by Ollama (server/prompt.go drops the oldest messages, the runner
shifts context). The service estimates every prompt's tokens first (characters per token calibrated per model
against the ``prompt_eval_count`` Ollama reports; images by the model's encoder) and refuses a request that cannot
fit the window minus its answer budget: 400 ``context_length_exceeded`` on /v1 (OpenAI's code, LiteLLM's
context-window fallback), 413 with the numbers on /api/*.
"""

from __future__ import annotations

import math
from typing import Any

from config import ModelSpec, Settings
from core.errors import ServiceError
from upstream.ollamaVersion import OllamaFeatures, isQwen25vl, qwenKeptPixels

MIN_VISION_CONTEXT = 2048
FALLBACK_CONTEXT = 4096
"""The window assumed when neither the model nor [ollama] sets num_ctx (Ollama's smallest default)."""
START_CHARS_PER_TOKEN = 3.0
"""Before any calibration: 3 characters per token (Latin text runs ~3.5-4.5, code and German compounds less)."""
MIN_CHARS_PER_TOKEN, MAX_CHARS_PER_TOKEN = 1.5, 6.0
SAFETY = 1.1
"""Estimates are raised by 10 % so a slightly optimistic calibration still refuses rather than cuts."""
MESSAGE_OVERHEAD_TOKENS = 8
"""Chat-template tokens per message (role markers, separators)."""
DEFAULT_IMAGE_TOKENS = 768
"""Ollama's own per-image estimate for the window check (server/prompt.go chatPrompt imageNumTokens)."""
PIXELS_PER_QWEN_TOKEN = 28 * 28
CALIBRATION_WEIGHT = 0.3
MIN_CALIBRATION_CHARS = 200
CONTEXT_EXCEEDED = "context_length_exceeded"


def configuredWindow(settings: Settings, spec: ModelSpec) -> int:
    return spec.numCtx or settings.ollama.num_ctx


def modelWindow(settings: Settings, spec: ModelSpec, contextLength: int, vision: bool) -> int:
    """The num_ctx this model is loaded with; 0 = none configured (Ollama's default, assumed FALLBACK_CONTEXT)."""
    window = configuredWindow(settings, spec)
    if window <= 0:
        return 0
    if contextLength > 0:
        window = min(window, contextLength)
    return max(window, MIN_VISION_CONTEXT) if vision else window


def runnerOptions(window: int) -> dict[str, Any]:
    """The options that decide Ollama's runner: the same dict for every request and the warm-up of a model."""
    return {"num_ctx": window} if window > 0 else {}


def effectiveWindow(window: int) -> int:
    return window if window > 0 else FALLBACK_CONTEXT


class TokenEstimator:
    """Prompt-token estimates per Ollama model, calibrated from what Ollama reports (prompt_eval_count)."""

    def __init__(self) -> None:
        self.charsPerToken: dict[str, float] = {}
        self.samples: dict[str, int] = {}

    def ratio(self, ollamaName: str) -> float:
        return self.charsPerToken.get(ollamaName, START_CHARS_PER_TOKEN)

    def textTokens(self, ollamaName: str, chars: int) -> int:
        return math.ceil(chars / self.ratio(ollamaName) * SAFETY)

    def promptTokens(self, ollamaName: str, chars: int, messages: int, imageTokens: int) -> int:
        return self.textTokens(ollamaName, chars) + messages * MESSAGE_OVERHEAD_TOKENS + imageTokens

    def observe(self, ollamaName: str, chars: int, messages: int, imageTokens: int, reported: int,
                window: int) -> None:
        """Learn characters per token from a finished call (skipped when Ollama may have cut the prompt)."""
        textTokens = reported - messages * MESSAGE_OVERHEAD_TOKENS - imageTokens
        if chars < MIN_CALIBRATION_CHARS or textTokens <= 0 or reported >= effectiveWindow(window):
            return
        observed = min(max(chars / textTokens, MIN_CHARS_PER_TOKEN), MAX_CHARS_PER_TOKEN)
        current = self.charsPerToken.get(ollamaName)
        self.charsPerToken[ollamaName] = observed if current is None else (
            current + CALIBRATION_WEIGHT * (observed - current))
        self.samples[ollamaName] = self.samples.get(ollamaName, 0) + 1


def imageTokens(ollamaName: str, pixels: int | None, features: OllamaFeatures) -> int:
    """Tokens one image costs: qwen2.5vl one per 28x28 px after Ollama's downscale (to its version's budget; plus
    the vision start/end markers); other models Ollama's own estimate of 768. ``pixels`` None = unknown (the most)."""
    if isQwen25vl(ollamaName):
        kept = qwenKeptPixels(features)
        return math.ceil(min(pixels or kept, kept) / PIXELS_PER_QWEN_TOKEN) + 2
    return DEFAULT_IMAGE_TOKENS


def checkFits(window: int, promptTokens: int, answerTokens: int, externalName: str, openAi: bool) -> None:
    """Refuse a prompt that cannot fit the window with its answer budget (Ollama would cut it silently)."""
    limit = effectiveWindow(window)
    if promptTokens + answerTokens <= limit:
        return
    if openAi:
        raise ServiceError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"about {promptTokens + answerTokens} tokens (about {promptTokens} in the messages, "
                           f"{answerTokens} for the completion). Please reduce the length of the messages or "
                           f"the completion.", code=CONTEXT_EXCEEDED, param="messages")
    raise ServiceError(413, f"The input does not fit the context window of `{externalName}`: about {promptTokens} "
                       f"prompt tokens + {answerTokens} answer tokens > {limit}. Shorten the text, send fewer "
                       f"pages, or lower maxTokens.", code=CONTEXT_EXCEEDED,
                       extra={"contextWindow": limit, "promptTokens": promptTokens, "answerTokens": answerTokens})


class PromptMeasure:
    """One request's prompt size as estimated before sending; observe() calibrates from Ollama's count."""

    __slots__ = ("estimator", "ollamaName", "chars", "messages", "imageTokens", "tokens", "window")

    def __init__(self, estimator: TokenEstimator, ollamaName: str, chars: int, messages: int, imageTokens: int,
                 window: int) -> None:
        self.estimator = estimator
        self.ollamaName, self.chars, self.messages = ollamaName, chars, messages
        self.imageTokens, self.window = imageTokens, window
        self.tokens = estimator.promptTokens(ollamaName, chars, messages, imageTokens)

    def observe(self, estimator: TokenEstimator, done: dict[str, Any]) -> None:
        reported = done.get("prompt_eval_count")
        if isinstance(reported, int) and not isinstance(reported, bool):
            estimator.observe(self.ollamaName, self.chars, self.messages, self.imageTokens, reported, self.window)


def messageChars(messages: list[dict[str, Any]]) -> int:
    """Characters of an Ollama chat payload's messages that become prompt tokens (content, thinking, tool calls)."""
    total = 0
    for message in messages:
        for key in ("content", "thinking"):
            value = message.get(key)
            if isinstance(value, str):
                total += len(value)
        if message.get("tool_calls"):
            total += len(str(message["tool_calls"]))
    return total


def checkEmbedInputs(tokens: TokenEstimator, ollamaName: str, window: int, texts: list[str], param: str,
                     externalName: str) -> None:
    """400 naming the first input that cannot fit the embedding model's window (Ollama would cut its tail off
    silently, or, with truncate false, fail the whole call)."""
    limit = effectiveWindow(window)
    for index, text in enumerate(texts):
        estimate = tokens.textTokens(ollamaName, len(text))
        if estimate > limit:
            raise ServiceError(400, f"`{param}[{index}]` is about {estimate} tokens, more than the {limit}-token "
                               f"context window of `{externalName}`; split it into smaller chunks"
                               + (" or send truncate: true to embed only its beginning" if param == "texts" else ""),
                               code="input_too_long", param=f"{param}[{index}]",
                               extra={"index": index, "estimatedTokens": estimate, "contextWindow": limit})


def embedPayload(ollamaName: str, texts: list[str], window: int, truncate: bool, dimensions: int | None = None,
                 keepAlive: str | None = None) -> dict[str, Any]:
    """/api/embed body: the model's window and an explicit truncate (false: Ollama refuses instead of cutting),
    plus ``dimensions`` and ``keep_alive`` when given."""
    payload: dict[str, Any] = {"model": ollamaName, "input": texts, "truncate": truncate}
    options = runnerOptions(window)
    if options:
        payload["options"] = options
    if dimensions:
        payload["dimensions"] = dimensions
    if keepAlive:
        payload["keep_alive"] = keepAlive
    return payload


def observeEmbed(tokens: TokenEstimator, ollamaName: str, texts: list[str], window: int, answer: Any) -> None:
    """Calibrate characters per token from an embedding call (only when no input came near the window)."""
    reported = answer.get("prompt_eval_count") if isinstance(answer, dict) else None
    longest = max((len(text) for text in texts), default=0)
    if isinstance(reported, int) and tokens.textTokens(ollamaName, longest) < effectiveWindow(window) // 2:
        tokens.observe(ollamaName, sum(len(text) for text in texts), 0, 0, reported, reported + 1)
