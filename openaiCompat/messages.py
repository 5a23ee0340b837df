"""OpenAI messages (and Responses-shaped bodies) to Ollama chat messages: roles, content parts, tool calls and
results."""

from __future__ import annotations

from typing import Any

import orjson

from openaiCompat.basics import invalid
from openaiCompat.images import ImageRules, contentParts

ROLE_NAMES = "system, developer, user, assistant or tool"


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
