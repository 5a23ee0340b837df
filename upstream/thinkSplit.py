"""Reasoning that arrives inside ``content``: Ollama before v0.12.4 (commit 90d429f5a) leaves a thinking model's
``<think>...</think>`` in the answer when ``think`` was not sent, and deepseek-r1 with ``think: false`` can leak
its trace ending in ``</think>`` (ollama#10964). The service sends ``think`` explicitly, and still moves a leading
``<think>`` block (or a leaked trace before a lone ``</think>``) out of the content into the reasoning, so it never
reaches the answer or a schema validation.
"""

from __future__ import annotations

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"
LEAK_SCAN_CHARS = 20000
"""A lone ``</think>`` further into the answer than this is taken as the answer's own text."""
LEAK_HOLD_CHARS = 4000
"""Streaming with a possible leak: content is held back until ``</think>`` or this many characters."""


def splitThinking(text: str, leaked: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole content string; ``leaked``: also take text before a lone ``</think>`` as
    reasoning (only for thinking models, whose answers are not expected to contain the tag)."""
    stripped = text.lstrip()
    if stripped.startswith(OPEN_TAG):
        body = stripped[len(OPEN_TAG):]
        end = body.find(CLOSE_TAG)
        if end == -1:
            return body.strip(), ""
        return body[:end].strip(), body[end + len(CLOSE_TAG):].lstrip()
    end = text.find(CLOSE_TAG, 0, LEAK_SCAN_CHARS) if leaked else -1
    if end != -1 and OPEN_TAG not in text[:end]:
        return text[:end].strip(), text[end + len(CLOSE_TAG):].lstrip()
    return "", text


class ThinkSplitter:
    """Streaming version for a leading ``<think>`` block: feed content pieces, get (reasoning, content) pieces.
    Content is held back only while it could still be the start of ``<think>``."""

    def __init__(self, leaked: bool = False) -> None:
        self.state = "start"  # start -> thinking -> after (strip leading whitespace once) -> plain
        self.pending = ""
        self.leaked = leaked
        """think was false on a thinking model: a trace ending in a lone </think> may come first (ollama#10964)."""

    def feed(self, piece: str) -> tuple[str, str]:
        if self.state == "plain":
            return "", piece
        self.pending += piece
        if self.state == "start":
            return self._atStart()
        if self.state == "thinking":
            return self._inThinking()
        return self._afterThinking()

    def _atStart(self) -> tuple[str, str]:
        head = self.pending.lstrip()
        if self.leaked and not OPEN_TAG.startswith(head[:len(OPEN_TAG)]):
            return self._leakScan()
        if head.startswith(OPEN_TAG):
            self.pending = head[len(OPEN_TAG):]
            self.state = "thinking"
            return self._inThinking()
        if OPEN_TAG.startswith(head):  # "", "<", "<th" ...: wait for more
            return "", ""
        self.state, text, self.pending = "plain", self.pending, ""
        return "", text

    def _leakScan(self) -> tuple[str, str]:
        end = self.pending.find(CLOSE_TAG)
        if end != -1:
            reasoning, self.pending = self.pending[:end].strip(), self.pending[end + len(CLOSE_TAG):]
            self.state = "after"
            _, content = self._afterThinking()
            return reasoning, content
        if len(self.pending) > LEAK_HOLD_CHARS:
            self.state, text, self.pending = "plain", self.pending, ""
            return "", text
        return "", ""

    def _inThinking(self) -> tuple[str, str]:
        end = self.pending.find(CLOSE_TAG)
        if end != -1:
            reasoning, self.pending = self.pending[:end], self.pending[end + len(CLOSE_TAG):]
            self.state = "after"
            _, content = self._afterThinking()
            return reasoning, content
        keep = _partialSuffix(self.pending, CLOSE_TAG)
        reasoning, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return reasoning, ""

    def _afterThinking(self) -> tuple[str, str]:
        text = self.pending.lstrip()
        self.pending = ""
        if text:
            self.state = "plain"
        return "", text

    def flush(self) -> tuple[str, str]:
        """What is still held back when the stream ends."""
        text, self.pending = self.pending, ""
        if self.state == "thinking":
            return text, ""
        return "", text if self.state != "start" else text


def _partialSuffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
