"""Ollama answers to OpenAI's ``chat.completion`` and NDJSON chunks to SSE ``chat.completion.chunk`` frames."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from core.errors import ServiceError, openAiErrorBody
from openaiCompat.basics import newCompletionId, newToolCallId
from upstream.thinkSplit import ThinkSplitter, splitThinking

DONE_FRAME = b"data: [DONE]\n\n"


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


def chatCompletion(answer: dict[str, Any], externalName: str, leaked: bool = False) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` from Ollama's single answer (reasoning left in content moved out)."""
    message = answer.get("message") or {}
    toolCalls = [openAiToolCall(call) for call in message.get("tool_calls") or ()]
    inlineReasoning, content = splitThinking(message.get("content") or "", leaked)
    converted: dict[str, Any] = {"role": "assistant", "content": content if content or not toolCalls else None}
    if toolCalls:
        converted["tool_calls"] = toolCalls
    reasoning = "\n\n".join(part for part in (message.get("thinking"), inlineReasoning) if part)
    if reasoning:
        converted["reasoning_content"] = reasoning
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

    __slots__ = ("completionId", "created", "model", "toolCallCount", "splitter", "onDone", "head")

    def __init__(self, externalName: str, onDone: Callable[[dict[str, Any]], None] | None = None,
                 leaked: bool = False) -> None:
        self.onDone = onDone
        """Called with Ollama's final line (prompt-token calibration)."""
        self.completionId = newCompletionId()
        self.created = int(time.time())
        self.model = externalName
        self.toolCallCount = 0
        self.splitter = ThinkSplitter(leaked)
        """A leading <think>...</think> in content goes to reasoning_content (upstream/thinkSplit.py)."""
        self.head = sseFrame({"id": self.completionId, "object": "chat.completion.chunk", "created": self.created,
                              "model": self.model, "choices": []})[:-len(b'[]}\n\n')] + b'[{"index":0,"delta":'
        """The bytes every chunk frame starts with (only the delta and finish reason differ from frame to frame)."""

    def _frame(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        """Same bytes as ``sseFrame`` of the whole chunk object, with only the delta serialised per frame."""
        return b"".join((self.head, orjson.dumps(delta), b',"logprobs":null,"finish_reason":',
                         orjson.dumps(finish), b"}]}\n\n"))

    def roleFrame(self) -> bytes:
        return self._frame({"role": "assistant", "content": ""})

    def deltaFrame(self, chunk: dict[str, Any]) -> bytes | None:
        """The content/reasoning/tool-call delta of one chunk, or None when it carries nothing."""
        message = chunk.get("message")
        if not message:
            return None
        delta: dict[str, Any] = {}
        reasoning, content = self.splitter.feed(message.get("content") or "")
        if chunk.get("done"):
            lateReasoning, lateContent = self.splitter.flush()
            reasoning, content = reasoning + lateReasoning, content + lateContent
        reasoning = (message.get("thinking") or "") + reasoning
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if message.get("tool_calls"):
            delta["tool_calls"] = [self._toolCallDelta(call) for call in message["tool_calls"]]
        return self._frame(delta) if delta else None

    def _toolCallDelta(self, call: dict[str, Any]) -> dict[str, Any]:
        converted = openAiToolCall(call)
        converted["index"] = self.toolCallCount
        self.toolCallCount += 1
        return converted

    def finishFrame(self, done: dict[str, Any]) -> bytes:
        if self.onDone is not None:
            self.onDone(done)
        return self._frame({}, finishReason(done.get("done_reason"), self.toolCallCount > 0))

    def usageFrame(self, done: dict[str, Any]) -> bytes:
        return sseFrame({"id": self.completionId, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.model, "choices": [], "usage": usageOf(done)})
