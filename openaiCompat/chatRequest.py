"""OpenAI chat bodies to Ollama /api/chat payloads: sampling options, response_format, tools, reasoning, and the
ChatPlan of a request.

A parameter the client did not send is not sent, so the model's own defaults stand.
Spec: https://platform.openai.com/docs/api-reference/chat and ``/work/shared/reference/ollama-api.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from config import Settings
from core.errors import ServiceError
from guard.requestLimits import PixelBudget
from openaiCompat.basics import (
    MAX_TOKENS_RANGE,
    SEED_RANGE,
    TOP_K_RANGE,
    checkedInteger,
    checkedNumber,
    flagOf,
    invalid,
    logger,
    stopList,
)
from openaiCompat.images import ImageRules, encodePendingImages
from openaiCompat.messages import fromResponsesShape, translateMessages
from upstream.contextWindow import PromptMeasure, TokenEstimator, checkFits, imageTokens, messageChars
from upstream.modelRegistry import ResolvedModel
from upstream.schemaGrammar import checkGrammar
from upstream.structuredOutput import checkSchema

KNOWN_CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens",
    "stop", "seed", "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
    "reasoning_effort", "n", "top_k", "min_p", "repetition_penalty",
})


NUMBER_OPTIONS = (  # (OpenAI field, Ollama option, lowest, highest)
    ("temperature", "temperature", 0.0, 2.0),
    ("top_p", "top_p", 0.0, 1.0),
    ("presence_penalty", "presence_penalty", -2.0, 2.0),
    ("frequency_penalty", "frequency_penalty", -2.0, 2.0),
    ("min_p", "min_p", 0.0, 1.0),
    ("repetition_penalty", "repeat_penalty", 0.0, 10.0),
)


REASONING_EFFORTS: dict[str, bool | str] = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high",
}


THINK_LEVEL_MODEL_PREFIXES = ("gpt-oss",)


"""Ollama models that take ``think`` as a level and cannot switch thinking off."""


ANSWER_RESERVE_TOKENS = 256
"""Room kept for the answer when a /v1 request sets no max_tokens (the prompt alone must leave this free)."""


def buildOptions(body: dict[str, Any], numCtx: int) -> dict[str, Any]:
    """Ollama ``options`` from the sampling fields that were sent (plus the configured ``num_ctx``)."""
    options: dict[str, Any] = {"num_ctx": numCtx} if numCtx > 0 else {}
    for field, option, low, high in NUMBER_OPTIONS:
        value = body.get(field)
        if value is not None:
            options[option] = checkedNumber(value, field, low, high)
    for field in ("max_completion_tokens", "max_tokens"):
        if body.get(field) is not None:
            options["num_predict"] = checkedInteger(body[field], field, MAX_TOKENS_RANGE)
            break
    if body.get("seed") is not None:
        options["seed"] = checkedInteger(body["seed"], "seed", SEED_RANGE)
    if body.get("top_k") is not None:
        options["top_k"] = checkedInteger(body["top_k"], "top_k", TOP_K_RANGE)
    if body.get("stop") is not None:
        options["stop"] = stopList(body["stop"])
    return options


def _checkedSchema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, checked as /api checks it (a valid JSON Schema, only local references); 400 otherwise."""
    try:
        checkSchema(schema)
    except ServiceError as exc:
        problem = exc.message.removeprefix("schema: ")
        raise invalid(f"`response_format.json_schema.schema`: {problem}", "response_format",
                      code="invalid_schema") from None
    return schema


def ollamaFormat(responseFormat: Any) -> str | dict[str, Any] | None:
    """``response_format`` as Ollama's ``format``: ``"json"``, a JSON schema, or None for plain text."""
    if responseFormat is None:
        return None
    kind = responseFormat.get("type") if isinstance(responseFormat, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = responseFormat.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            return "json"
        if not isinstance(schema, dict):
            raise invalid("`response_format.json_schema.schema` must be a JSON schema object",
                          "response_format.json_schema.schema")
        return _checkedSchema(schema)
    raise invalid("`response_format.type` must be text, json_object or json_schema", "response_format.type")


def _normaliseTool(tool: Any, index: int) -> dict[str, Any]:
    """One OpenAI tool as Ollama's ``{"type":"function","function":{name, description, parameters}}``."""
    param = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise invalid(f"`{param}` must be a function tool ({{\"type\": \"function\", \"function\": {{...}}}}); "
                      "other tool types are not supported", param)
    function = tool.get("function", tool)  # the Responses API puts name/parameters at the top level
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise invalid(f"`{param}.function.name` is required", f"{param}.function.name")
    normalised: dict[str, Any] = {"name": name}
    if function.get("description") is not None:
        normalised["description"] = function["description"]
    normalised["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", "function": normalised}


def selectTools(tools: Any, toolChoice: Any) -> list[dict[str, Any]] | None:
    """The tools to send, honouring ``tool_choice``: ``none`` sends none, a named function sends only that one.

    ``required`` cannot be enforced by Ollama: the tools are sent and the model decides (documented)."""
    if not tools:
        if toolChoice not in (None, "none", "auto"):
            raise invalid("`tool_choice` needs a non-empty `tools` list", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise invalid("`tools` must be a list of function tools", "tools")
    normalised = [_normaliseTool(tool, index) for index, tool in enumerate(tools)]
    if toolChoice is None or toolChoice in ("auto", "required"):
        return normalised
    if toolChoice == "none":
        return None
    return _namedTool(normalised, toolChoice)


def _namedTool(tools: list[dict[str, Any]], toolChoice: Any) -> list[dict[str, Any]]:
    function = toolChoice.get("function", toolChoice) if isinstance(toolChoice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise invalid("`tool_choice` must be none, auto, required or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    chosen = [tool for tool in tools if tool["function"]["name"] == name]
    if not chosen:
        raise invalid(f"`tool_choice` names the function `{name}`, which is not in `tools`", "tool_choice")
    return chosen


def usesThinkLevels(ollamaName: str) -> bool:
    return ollamaName.lower().startswith(THINK_LEVEL_MODEL_PREFIXES)


def thinkValue(effort: Any, resolved: ResolvedModel) -> bool | str | None:
    """Ollama's ``think`` for ``reasoning_effort``, always explicit for a thinking model (Ollama before v0.12.4
    otherwise leaves ``<think>`` in the content): true, or "medium" for level-only models, when absent; None (not
    sent) when the model cannot think."""
    if effort is None:
        if "thinking" not in resolved.capabilities:
            return None
        return "medium" if usesThinkLevels(resolved.ollamaName) else True
    if not isinstance(effort, str) or effort not in REASONING_EFFORTS:
        raise invalid(f"`reasoning_effort` must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
    if "thinking" not in resolved.capabilities:
        logger.debug("reasoning_effort dropped: %s cannot think", resolved.externalName)
        return None
    level = REASONING_EFFORTS[effort]
    if usesThinkLevels(resolved.ollamaName):
        return level or "low"  # such models cannot switch thinking off; "low" is the least
    return bool(level)


@dataclass(slots=True)
class ChatPlan:
    """An OpenAI chat request translated for Ollama."""

    payload: dict[str, Any]
    stream: bool
    includeUsage: bool
    measure: PromptMeasure | None = None
    leakedThink: bool = False
    """think false on a thinking model: its trace may still arrive in content, ending in </think>."""


def checkChatModel(resolved: ResolvedModel) -> None:
    """Embedding and speech-to-text models cannot chat."""
    spec = resolved.spec
    if spec.type == "embedding" or ("embedding" in resolved.capabilities and
                                    "completion" not in resolved.capabilities):
        raise invalid(f"The model `{spec.externalName}` is an embedding model; use POST /v1/embeddings", "model")
    if spec.backend == "whisper":
        raise invalid(f"The model `{spec.externalName}` transcribes audio; use POST /v1/audio/transcriptions",
                      "model")


def _checkSupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid("`n` must be 1: this service returns one choice per request", "n")
    if logger.isEnabledFor(logging.DEBUG):
        ignored = sorted(key for key in body if key not in KNOWN_CHAT_FIELDS)
        if ignored:
            logger.debug("chat fields accepted and ignored: %s", ", ".join(ignored))


def _includeUsage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("`stream_options` must be an object", "stream_options")
    return flagOf(options, "include_usage")


def buildChatPlan(body: dict[str, Any], resolved: ResolvedModel, settings: Settings,
                  tokens: TokenEstimator | None = None) -> ChatPlan:
    """Validate an OpenAI chat body for its resolved model and build the Ollama /api/chat payload (the model's one
    context window; refused with context_length_exceeded when the prompt cannot fit it)."""
    body = fromResponsesShape(body)
    checkChatModel(resolved)
    _checkSupported(body)
    payload: dict[str, Any] = {"model": resolved.ollamaName, "messages": None,
                               "keep_alive": settings.ollama.keep_alive}
    options = buildOptions(body, resolved.window)
    if options:
        payload["options"] = options
    tools = selectTools(body.get("tools"), body.get("tool_choice"))
    if tools:
        if "tools" not in resolved.capabilities:
            raise invalid(f"The model `{resolved.externalName}` does not support tools; send the request without "
                          "`tools` or choose a model that supports them", "tools", code="model_not_tool_capable")
        payload["tools"] = tools
    responseFormat = ollamaFormat(body.get("response_format"))
    if responseFormat is not None:
        checkGrammar(responseFormat, resolved.features.label, "response_format.json_schema.schema")
        payload["format"] = responseFormat
    think = thinkValue(body.get("reasoning_effort"), resolved)
    if think is not None:
        payload["think"] = think
    stream = flagOf(body, "stream")
    rules = ImageRules(resolved.externalName, "vision" in resolved.capabilities, settings,
                       resolved.spec.imagesPerMessage, PixelBudget(settings.limits.max_request_pixels))
    payload["messages"], _ = translateMessages(body.get("messages"), rules)
    if resolved.features.truncateFlag:
        payload["truncate"] = False  # Ollama refuses instead of dropping the oldest messages
    measure = measureChat(payload, resolved, settings, tokens or TokenEstimator())
    answerBudget = options.get("num_predict") or ANSWER_RESERVE_TOKENS
    checkFits(resolved.window, measure.tokens, answerBudget, resolved.externalName, openAi=True)
    leaked = payload.get("think") is False
    encodePendingImages(payload["messages"])  # only now: every image passed the pixel checks and the prompt fits
    return ChatPlan(payload, stream, stream and _includeUsage(body), measure, leaked)


def measureChat(payload: dict[str, Any], resolved: ResolvedModel, settings: Settings,
                tokens: TokenEstimator) -> PromptMeasure:
    """The prompt estimate of an Ollama chat payload: messages, tool definitions, images at the model's budget."""
    messages = payload["messages"]
    chars = messageChars(messages) + (len(str(payload["tools"])) if payload.get("tools") else 0)
    images = sum(len(message.get("images") or ()) for message in messages)
    return PromptMeasure(tokens, resolved.ollamaName, chars, len(messages),
                         images * imageTokens(resolved.ollamaName, None, resolved.features), resolved.window)
