"""Translation between OpenAI's Chat Completions / Embeddings wire format and Ollama's native API.

Requests: an OpenAI chat body (a plain dict, validated by hand on the hot path) becomes an ``/api/chat`` payload;
a parameter the client did not send is not sent, so the model's own defaults stand.
Responses: Ollama's answer or NDJSON chunks become OpenAI's ``chat.completion`` / SSE ``chat.completion.chunk``
frames. Spec: https://platform.openai.com/docs/api-reference/chat and ``/work/shared/reference/ollama-api.md``.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import sys
import time
import uuid
import warnings
from array import array
from dataclasses import dataclass
from typing import Any

import orjson
from PIL import Image, UnidentifiedImageError

from config import Settings
from core.errors import ServiceError, openAiErrorBody
from guard.requestLimits import checkImagePixels, rejectRemoteImageUrl
from upstream.modelRegistry import ResolvedModel
from upstream.structuredOutput import checkSchema

logger = logging.getLogger("poweron.openai")

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
MAX_TOKENS_RANGE = (1, 1_000_000)
"""``max_tokens`` / ``max_completion_tokens``: far above any model's context, far below what breaks JSON."""
SEED_RANGE = (-(2**63), 2**63 - 1)
"""A signed 64-bit integer, as Ollama takes it (-1 keeps meaning "random" for llama.cpp)."""
TOP_K_RANGE = (1, 1000)
DIMENSIONS_RANGE = (1, 16384)
"""The same limit as ``dimensions`` on /api/embed."""
REASONING_EFFORTS: dict[str, bool | str] = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high",
}
THINK_LEVEL_MODEL_PREFIXES = ("gpt-oss",)
"""Ollama models that take ``think`` as a level and cannot switch thinking off."""
OLLAMA_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
"""Formats Ollama decodes itself; other formats Pillow reads are re-encoded as PNG."""
MAX_EMBEDDING_INPUTS = 2048
ROLE_NAMES = "system, developer, user, assistant or tool"
PDF_HINT = ("PDF files are not accepted on /v1/chat/completions; send them to POST /api/analyze "
            "(it renders the pages for a vision model), or send the pages as image_url parts")
DONE_FRAME = b"data: [DONE]\n\n"


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ServiceError:
    """A 400 in OpenAI's invalid_request_error shape."""
    return ServiceError(400, message, code=code, param=param)


def newCompletionId() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def newToolCallId() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------- request fields


def requireModelName(body: dict[str, Any]) -> str:
    """The ``model`` field, present and a non-empty string."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("`model` is required: the name of a model from GET /v1/models", "model")
    return model


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(f"`{name}` must be a number from {low:g} to {high:g}", name)
    return value


def _integer(value: Any, name: str, bounds: tuple[int, int]) -> int:
    """An integer within ``bounds`` (inclusive); a whole float such as 5.0 counts."""
    low, high = bounds
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"`{name}` must be an integer from {low:,} to {high:,}", name)
    return value


def _stopList(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("`stop` must be a non-empty string or a list of non-empty strings", "stop")
    return stops


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"`{name}` must be true or false", name)
    return value


def buildOptions(body: dict[str, Any], numCtx: int) -> dict[str, Any]:
    """Ollama ``options`` from the sampling fields that were sent (plus the configured ``num_ctx``)."""
    options: dict[str, Any] = {"num_ctx": numCtx} if numCtx > 0 else {}
    for field, option, low, high in NUMBER_OPTIONS:
        value = body.get(field)
        if value is not None:
            options[option] = _number(value, field, low, high)
    for field in ("max_completion_tokens", "max_tokens"):
        if body.get(field) is not None:
            options["num_predict"] = _integer(body[field], field, MAX_TOKENS_RANGE)
            break
    if body.get("seed") is not None:
        options["seed"] = _integer(body["seed"], "seed", SEED_RANGE)
    if body.get("top_k") is not None:
        options["top_k"] = _integer(body["top_k"], "top_k", TOP_K_RANGE)
    if body.get("stop") is not None:
        options["stop"] = _stopList(body["stop"])
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
    """Ollama's ``think`` for ``reasoning_effort``; None (not sent) when absent or the model cannot think."""
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in REASONING_EFFORTS:
        raise invalid(f"`reasoning_effort` must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
    if "thinking" not in resolved.capabilities:
        logger.debug("reasoning_effort dropped: %s cannot think", resolved.externalName)
        return None
    level = REASONING_EFFORTS[effort]
    if usesThinkLevels(resolved.ollamaName):
        return level or "low"  # such models cannot switch thinking off; "low" is the least
    return bool(level)


# ---------------------------------------------------------------- messages and images


@dataclass(frozen=True, slots=True)
class ImageRules:
    """What images a request may carry for its model."""

    externalName: str
    visionAllowed: bool
    settings: Settings
    perMessage: int


def _openImage(raw: bytes, param: str) -> Image.Image:
    """The image with its header read (format and size known, pixels not decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ServiceError(413, f"The image in `{param}` has too many pixels ([limits] max_image_pixels)",
                           code="image_too_large", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise invalid(f"`{param}` is not a readable image (send PNG, JPEG or WebP)", param) from None


def _asPng(image: Image.Image, param: str) -> str:
    """Formats Ollama cannot decode (GIF, BMP, TIFF, ...) re-encoded as PNG (first frame)."""
    buffer = io.BytesIO()
    try:
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, "PNG")
    except (OSError, ValueError):
        raise invalid(f"`{param}` could not be decoded as an image", param) from None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decodeImageDataUrl(url: Any, param: str, settings: Settings) -> str:
    """Raw base64 for Ollama from a ``data:image/...;base64,`` URL, checked as a real image within
    ``[limits] max_image_pixels`` (read from the header, the pixels are not decoded). Remote URLs are refused."""
    if not isinstance(url, str) or not url:
        raise invalid(f"`{param}` needs an image URL", param)
    rejectRemoteImageUrl(url, param)
    header, comma, data = url.partition(",")
    if not comma or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise invalid(f"`{param}` must be a data URL like data:image/png;base64,<data>", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"`{param}` is not valid base64", param) from None
    image = _openImage(raw, param)
    checkImagePixels(*image.size, settings, param)
    return data if image.format in OLLAMA_IMAGE_FORMATS else _asPng(image, param)


def _imagePart(part: dict[str, Any], param: str, rules: ImageRules | None) -> str:
    if rules is None:
        raise invalid(f"`{param}`: images are only accepted in user messages", param)
    if not rules.visionAllowed:
        raise invalid(f"The model `{rules.externalName}` cannot read images (it has no vision capability); "
                      "choose a poweron-vision-* model from GET /v1/models", param, code="model_not_vision_capable")
    imageUrl = part.get("image_url")
    url = imageUrl.get("url") if isinstance(imageUrl, dict) else imageUrl
    return decodeImageDataUrl(url, f"{param}.image_url.url", rules.settings)


def _filePart(part: dict[str, Any], param: str, rules: ImageRules | None) -> str:
    """LiteLLM's ``{"type":"file","file":{"file_data":"data:...;base64,..."}}``: images are read, PDFs refused."""
    file = part.get("file") if isinstance(part.get("file"), dict) else {}
    data = file.get("file_data")
    if isinstance(data, str) and data.lower().startswith("data:image/"):
        return _imagePart({"image_url": data}, param, rules)
    if isinstance(data, str) and data.lower().startswith("data:application/pdf"):
        raise invalid(f"`{param}`: {PDF_HINT}", param, code="unsupported_file_type")
    raise invalid(f"`{param}`: only images (data:image/...) are accepted as files; file ids are not supported",
                  param, code="unsupported_file_type")


def contentParts(content: Any, param: str, rules: ImageRules | None) -> tuple[str, list[str]]:
    """Text (parts joined by newlines) and raw-base64 images of a message's ``content``."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise invalid(f"`{param}.content` must be a string or a list of content parts", f"{param}.content")
    texts: list[str] = []
    images: list[str] = []
    for index, part in enumerate(content):
        _readPart(part, f"{param}.content[{index}]", rules, texts, images)
    return "\n".join(texts), images


def _readPart(part: Any, param: str, rules: ImageRules | None, texts: list[str], images: list[str]) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("text", "input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise invalid(f"`{param}.text` must be a string", f"{param}.text")
        texts.append(part["text"])
    elif kind in ("image_url", "input_image"):
        images.append(_imagePart(part, param, rules))
    elif kind == "file":
        images.append(_filePart(part, param, rules))
    elif kind == "input_audio":
        raise invalid(f"`{param}`: audio parts are not supported here; transcribe with POST /v1/audio/transcriptions",
                      param)
    elif kind != "refusal":
        raise invalid(f"`{param}.type` must be text or image_url", f"{param}.type")


def _toolArguments(arguments: Any, param: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else None
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise invalid(f"`{param}` must be a JSON object encoded as a string", param)
    return parsed


def _ollamaToolCall(call: Any, param: str, toolNames: dict[str, str]) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise invalid(f"`{param}.function.name` is required", f"{param}.function.name")
    converted: dict[str, Any] = {"function": {"name": name, "arguments": _toolArguments(
        function.get("arguments"), f"{param}.function.arguments")}}
    callId = call.get("id")
    if isinstance(callId, str) and callId:
        converted["id"] = callId
        toolNames[callId] = name
    return converted


def _assistantMessage(message: dict[str, Any], param: str, toolNames: dict[str, str]) -> dict[str, Any]:
    text, _ = contentParts(message.get("content"), param, None)
    converted: dict[str, Any] = {"role": "assistant", "content": text}
    thinking = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(thinking, str) and thinking:
        converted["thinking"] = thinking
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise invalid(f"`{param}.tool_calls` must be a list", f"{param}.tool_calls")
        converted["tool_calls"] = [_ollamaToolCall(call, f"{param}.tool_calls[{index}]", toolNames)
                                   for index, call in enumerate(calls)]
    return converted


def _toolMessage(message: dict[str, Any], param: str, toolNames: dict[str, str]) -> dict[str, Any]:
    text, _ = contentParts(message.get("content"), param, None)
    converted: dict[str, Any] = {"role": "tool", "content": text}
    callId = message.get("tool_call_id")
    name = toolNames.get(callId) if isinstance(callId, str) else None
    name = name or message.get("name")
    if isinstance(name, str) and name:
        converted["tool_name"] = name
    if isinstance(callId, str) and callId:
        converted["tool_call_id"] = callId
    return converted


def _userMessage(message: dict[str, Any], param: str, rules: ImageRules) -> dict[str, Any]:
    text, images = contentParts(message.get("content"), param, rules)
    if not images:
        return {"role": "user", "content": text}
    if rules.perMessage and len(images) > rules.perMessage:
        raise invalid(f"The model `{rules.externalName}` reads at most {rules.perMessage} image(s) per message; "
                      f"`{param}` has {len(images)}", f"{param}.content")
    return {"role": "user", "content": text, "images": images}


def translateMessage(message: Any, index: int, rules: ImageRules, toolNames: dict[str, str]) -> dict[str, Any]:
    """One OpenAI message as an Ollama message."""
    param = f"messages[{index}]"
    role = message.get("role") if isinstance(message, dict) else None
    if role == "user":
        return _userMessage(message, param, rules)
    if role == "assistant":
        return _assistantMessage(message, param, toolNames)
    if role in ("system", "developer"):
        return {"role": "system", "content": contentParts(message.get("content"), param, None)[0]}
    if role in ("tool", "function"):
        return _toolMessage(message, param, toolNames)
    if not isinstance(message, dict):
        raise invalid(f"`{param}` must be an object with `role` and `content`", param)
    raise invalid(f"`{param}.role` must be {ROLE_NAMES}", f"{param}.role")


def translateMessages(messages: Any, rules: ImageRules) -> tuple[list[dict[str, Any]], bool]:
    """Ollama messages and whether any carries images; assistant tool-call ids name the later tool results."""
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty list", "messages")
    toolNames: dict[str, str] = {}
    converted = [translateMessage(message, index, rules, toolNames) for index, message in enumerate(messages)]
    return converted, any("images" in message for message in converted)


# ---------------------------------------------------------------- Responses-shaped bodies (Cursor)


def _responsesToolCall(item: dict[str, Any]) -> dict[str, Any]:
    return {"id": item.get("call_id") or item.get("id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}


def _appendResponsesItem(messages: list[dict[str, Any]], item: Any, index: int) -> None:
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind == "message":
        messages.append({"role": item.get("role"), "content": item.get("content")})
    elif kind == "function_call":
        previous = messages[-1] if messages else None
        if previous is not None and previous.get("role") == "assistant" and previous.get("tool_calls"):
            previous["tool_calls"].append(_responsesToolCall(item))
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [_responsesToolCall(item)]})
    elif kind == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
    elif kind != "reasoning":
        raise invalid(f"`input[{index}]`: item type {kind!r} is not supported", f"input[{index}]")


def fromResponsesShape(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses-API body (``input``, ``instructions``, ...) posted to /chat/completions, as a chat body.

    Cursor sends such bodies for some model names while expecting a Chat Completions answer; a body with
    ``messages`` is returned unchanged."""
    if "messages" in body or "input" not in body:
        return body
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for index, item in enumerate(items):
            _appendResponsesItem(messages, item, index)
    converted = {**body, "messages": messages}
    if body.get("max_output_tokens") is not None:
        converted["max_completion_tokens"] = body["max_output_tokens"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        converted["reasoning_effort"] = reasoning["effort"]
    textFormat = body.get("text", {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(textFormat, dict) and textFormat.get("type") == "json_schema":
        converted["response_format"] = {"type": "json_schema", "json_schema": textFormat}
    elif isinstance(textFormat, dict):
        converted["response_format"] = textFormat
    return converted


# ---------------------------------------------------------------- the request as a whole


@dataclass(slots=True)
class ChatPlan:
    """An OpenAI chat request translated for Ollama."""

    payload: dict[str, Any]
    stream: bool
    includeUsage: bool


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
    return _flag(options, "include_usage")


def buildChatPlan(body: dict[str, Any], resolved: ResolvedModel, settings: Settings) -> ChatPlan:
    """Validate an OpenAI chat body for its resolved model and build the Ollama /api/chat payload."""
    body = fromResponsesShape(body)
    checkChatModel(resolved)
    _checkSupported(body)
    payload: dict[str, Any] = {"model": resolved.ollamaName, "messages": None,
                               "keep_alive": settings.ollama.keep_alive}
    options = buildOptions(body, settings.ollama.num_ctx)
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
        payload["format"] = responseFormat
    think = thinkValue(body.get("reasoning_effort"), resolved)
    if think is not None:
        payload["think"] = think
    stream = _flag(body, "stream")
    rules = ImageRules(resolved.externalName, "vision" in resolved.capabilities, settings,
                       resolved.spec.imagesPerMessage)
    payload["messages"], _ = translateMessages(body.get("messages"), rules)
    return ChatPlan(payload, stream, stream and _includeUsage(body))


# ---------------------------------------------------------------- answers


def finishReason(doneReason: Any, sawToolCalls: bool) -> str:
    if sawToolCalls:
        return "tool_calls"
    return "length" if doneReason == "length" else "stop"


def usageOf(answer: dict[str, Any]) -> dict[str, int]:
    """OpenAI ``usage`` from Ollama's counts on the final line."""
    prompt = int(answer.get("prompt_eval_count") or 0)
    completion = int(answer.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openAiToolCall(call: dict[str, Any]) -> dict[str, Any]:
    """Ollama's tool call (``arguments`` an object) as OpenAI's (``arguments`` a JSON string, an id)."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
    return {"id": call.get("id") or newToolCallId(), "type": "function",
            "function": {"name": function.get("name", ""), "arguments": arguments}}


def chatCompletion(answer: dict[str, Any], externalName: str) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` from Ollama's single answer."""
    message = answer.get("message") or {}
    toolCalls = [openAiToolCall(call) for call in message.get("tool_calls") or ()]
    content = message.get("content") or ""
    converted: dict[str, Any] = {"role": "assistant", "content": content if content or not toolCalls else None}
    if toolCalls:
        converted["tool_calls"] = toolCalls
    if message.get("thinking"):
        converted["reasoning_content"] = message["thinking"]
    return {"id": newCompletionId(), "object": "chat.completion", "created": int(time.time()), "model": externalName,
            "choices": [{"index": 0, "message": converted, "logprobs": None,
                         "finish_reason": finishReason(answer.get("done_reason"), bool(toolCalls))}],
            "usage": usageOf(answer)}


def sseFrame(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def errorFrame(error: ServiceError) -> bytes:
    """The SSE frame for an error after the stream has started (the SDK raises APIError on it)."""
    return sseFrame(openAiErrorBody(error))


class ChatStreamTranslator:
    """Turns Ollama's NDJSON chunks into OpenAI ``chat.completion.chunk`` SSE frames, one frame per chunk."""

    __slots__ = ("completionId", "created", "model", "toolCallCount")

    def __init__(self, externalName: str) -> None:
        self.completionId = newCompletionId()
        self.created = int(time.time())
        self.model = externalName
        self.toolCallCount = 0

    def _frame(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sseFrame({"id": self.completionId, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.model,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    def roleFrame(self) -> bytes:
        return self._frame({"role": "assistant", "content": ""})

    def deltaFrame(self, chunk: dict[str, Any]) -> bytes | None:
        """The content/reasoning/tool-call delta of one chunk, or None when it carries nothing."""
        message = chunk.get("message")
        if not message:
            return None
        delta: dict[str, Any] = {}
        if message.get("thinking"):
            delta["reasoning_content"] = message["thinking"]
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("tool_calls"):
            delta["tool_calls"] = [self._toolCallDelta(call) for call in message["tool_calls"]]
        return self._frame(delta) if delta else None

    def _toolCallDelta(self, call: dict[str, Any]) -> dict[str, Any]:
        converted = openAiToolCall(call)
        converted["index"] = self.toolCallCount
        self.toolCallCount += 1
        return converted

    def finishFrame(self, done: dict[str, Any]) -> bytes:
        return self._frame({}, finishReason(done.get("done_reason"), self.toolCallCount > 0))

    def usageFrame(self, done: dict[str, Any]) -> bytes:
        return sseFrame({"id": self.completionId, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.model, "choices": [], "usage": usageOf(done)})


# ---------------------------------------------------------------- embeddings


def embeddingInputs(value: Any) -> list[str]:
    """``input`` as a list of non-empty strings (token arrays are not supported)."""
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs:
        raise invalid("`input` must be a non-empty string or a non-empty list of strings", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise invalid(f"`input` may hold at most {MAX_EMBEDDING_INPUTS} strings per request", "input")
    for index, text in enumerate(inputs):
        if not isinstance(text, str):
            raise invalid(f"`input[{index}]` must be a string (token arrays are not supported; send text)",
                          f"input[{index}]")
        if not text:
            raise invalid(f"`input[{index}]` is empty", f"input[{index}]")
    return inputs


def embeddingOptions(body: dict[str, Any]) -> tuple[bool, int | None]:
    """(base64 wanted, dimensions) from ``encoding_format`` and ``dimensions``."""
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise invalid("`encoding_format` must be float or base64", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = _integer(dimensions, "dimensions", DIMENSIONS_RANGE)
    return encoding == "base64", dimensions


def _shortened(vector: list[float], dimensions: int | None) -> list[float]:
    """Truncate to ``dimensions`` and re-normalise (Matryoshka), when Ollama returned more."""
    if not dimensions or len(vector) <= dimensions:
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(value * value for value in head)) or 1.0
    return [value / norm for value in head]


def _base64Floats(vector: list[float]) -> str:
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embeddingResponse(answer: dict[str, Any], externalName: str, asBase64: bool,
                      dimensions: int | None) -> dict[str, Any]:
    """OpenAI's embeddings list from Ollama's ``/api/embed`` answer."""
    data = []
    for index, vector in enumerate(answer.get("embeddings") or ()):
        vector = _shortened(vector, dimensions)
        data.append({"object": "embedding", "index": index,
                     "embedding": _base64Floats(vector) if asBase64 else vector})
    tokens = int(answer.get("prompt_eval_count") or 0)
    return {"object": "list", "data": data, "model": externalName,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
