"""Asking Ollama about documents and texts: chat payloads (as many images per message as the model takes, the
context window sized for the images), answers read from Ollama's stream with their token usage, page groups
answered one after another and combined with page markers, and structured output with one repair retry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from config import Settings
from core.errors import ServiceError
from documents.documentRender import PageImage, RenderedDocument
from upstream.contextWindow import (
    CONTEXT_EXCEEDED,
    PromptMeasure,
    TokenEstimator,
    checkFits,
    imageTokens,
    messageChars,
    runnerOptions,
)
from upstream.modelRegistry import ResolvedModel
from upstream.routing import BufferedStream, PrimedStream, RoutedOllama
from upstream.structuredOutput import repairPrompt, validateAnswer
from upstream.thinkSplit import ThinkSplitter, splitThinking

DEFAULT_TEMPERATURE = 0.0
"""Document extraction and neutralisation should give the same answer for the same input."""


@dataclass(slots=True)
class Usage:
    """Tokens and model time summed over every Ollama call of one request."""

    promptTokens: int = 0
    completionTokens: int = 0
    modelSeconds: float = 0.0

    def add(self, final: dict[str, Any]) -> None:
        self.promptTokens += int(final.get("prompt_eval_count") or 0)
        self.completionTokens += int(final.get("eval_count") or 0)

    def asDict(self) -> dict[str, int]:
        return {"promptTokens": self.promptTokens, "completionTokens": self.completionTokens,
                "totalTokens": self.promptTokens + self.completionTokens}


@dataclass(slots=True)
class ModelCall:
    """One chat request to Ollama and the pages it covers (empty for text requests)."""

    pages: list[int]
    payload: dict[str, Any]
    measure: PromptMeasure | None = None


@dataclass(slots=True)
class Answer:
    """The model's answer to one call."""

    pages: list[int]
    parts: list[str] = field(default_factory=list)
    thinkingParts: list[str] = field(default_factory=list)
    doneReason: str = "stop"
    value: Any = None
    splitter: ThinkSplitter = field(default_factory=ThinkSplitter)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def thinking(self) -> str:
        return "".join(self.thinkingParts)


def answerBudget(settings: Settings, resolved: ResolvedModel, maxTokens: int | None) -> int:
    """num_predict of a call: the caller's maxTokens, else the model's num_predict, else [ollama] num_predict
    (without one Ollama may generate up to 10 x num_ctx tokens)."""
    return maxTokens or resolved.spec.numPredict or settings.ollama.num_predict


def thinkFor(resolved: ResolvedModel) -> bool | str | None:
    """``think`` sent explicitly to thinking models (before Ollama v0.12.4 the trace lands in the content)."""
    if "thinking" not in resolved.capabilities:
        return None
    return "medium" if resolved.ollamaName.lower().startswith("gpt-oss") else True


def chatPayload(settings: Settings, resolved: ResolvedModel, messages: list[dict[str, Any]], *,
                temperature: float | None, maxTokens: int | None, schema: Any) -> dict[str, Any]:
    """Ollama /api/chat body for one call: the model's one window, a bounded answer, explicit think, truncate off."""
    options: dict[str, Any] = {"temperature": DEFAULT_TEMPERATURE if temperature is None else temperature,
                               **runnerOptions(resolved.window),
                               "num_predict": answerBudget(settings, resolved, maxTokens)}
    payload: dict[str, Any] = {"model": resolved.ollamaName, "messages": messages, "options": options,
                               "keep_alive": settings.ollama.keep_alive}
    if schema is not None:
        payload["format"] = schema
    think = thinkFor(resolved)
    if think is not None:
        payload["think"] = think
    if resolved.features.truncateFlag:
        payload["truncate"] = False
    return payload


def measuredCall(tokens: TokenEstimator, resolved: ResolvedModel, pages: list[int], payload: dict[str, Any],
                 images: list[PageImage]) -> ModelCall:
    """A call with its prompt estimate, refused (413) when prompt + answer budget cannot fit the window."""
    imageCost = sum(imageTokens(resolved.ollamaName, image.width * image.height, resolved.features)
                    for image in images)
    messages = payload["messages"]
    measure = PromptMeasure(tokens, resolved.ollamaName, messageChars(messages), len(messages), imageCost,
                            resolved.window)
    checkFits(resolved.window, measure.tokens, payload["options"]["num_predict"], resolved.externalName,
              openAi=False)
    return ModelCall(pages, payload, measure)


def systemMessages(fields: Any) -> list[dict[str, Any]]:
    return [{"role": "system", "content": fields.system}] if fields.system else []


def checkTextFits(settings: Settings, resolved: ResolvedModel, fields: Any, tokens: TokenEstimator) -> None:
    """Before rendering: refuse (413) an analysis whose text cannot fit the window with its answer budget even with
    the cheapest page (every call carries at least one), so a prompt that is too long costs no render. It counts
    less than ``measuredCall`` ever does (no page note, the smallest image), so it never refuses what would fit."""
    messages = [*systemMessages(fields), {"role": "user", "content": fields.prompt}]
    cheapestPage = imageTokens(resolved.ollamaName, 1, resolved.features)
    promptTokens = tokens.promptTokens(resolved.ollamaName, messageChars(messages), len(messages), cheapestPage)
    checkFits(resolved.window, promptTokens, answerBudget(settings, resolved, fields.maxTokens),
              resolved.externalName, openAi=False)


def pageGroups(images: list[PageImage], imagesPerMessage: int) -> list[list[PageImage]]:
    """All images in one message, or groups of ``imagesPerMessage`` (1 for models such as Llama 3.2 Vision)."""
    size = imagesPerMessage if imagesPerMessage > 0 else max(len(images), 1)
    return [images[start:start + size] for start in range(0, len(images), size)]


def pageNote(group: list[PageImage], document: RenderedDocument) -> str:
    """Tells the model which pages it sees, when the document has more than one page."""
    if document.pageCount <= 1:
        return ""
    pages = [image.page for image in group]
    if len(pages) == 1:
        return f"(This image is page {pages[0]} of a {document.pageCount}-page document.)\n\n"
    listed = ", ".join(str(page) for page in pages)
    return f"(The {len(pages)} images are pages {listed} of a {document.pageCount}-page document, in order.)\n\n"


def documentCalls(settings: Settings, resolved: ResolvedModel, document: RenderedDocument, fields: Any,
                  schema: Any, tokens: TokenEstimator | None = None) -> list[ModelCall]:
    """The Ollama calls for an analysis: one per page group. Pages that do not fit the model's window together
    are sent in smaller groups (halved until each fits; a single page that does not fit is a 413)."""
    tokens = tokens or TokenEstimator()
    size = resolved.spec.imagesPerMessage or max(len(document.images), 1)
    while True:
        try:
            return _groupCalls(settings, resolved, document, fields, schema, tokens, size)
        except ServiceError as exc:
            if exc.code != CONTEXT_EXCEEDED or size <= 1:
                raise
            size = (size + 1) // 2


def _groupCalls(settings: Settings, resolved: ResolvedModel, document: RenderedDocument, fields: Any,
                schema: Any, tokens: TokenEstimator, size: int) -> list[ModelCall]:
    system = systemMessages(fields)
    calls = []
    for group in pageGroups(document.images, size):
        content = pageNote(group, document) + fields.prompt
        message = {"role": "user", "content": content, "images": [image.base64Jpeg for image in group]}
        payload = chatPayload(settings, resolved, [*system, message], temperature=fields.temperature,
                              maxTokens=fields.maxTokens, schema=schema)
        calls.append(measuredCall(tokens, resolved, [image.page for image in group], payload, group))
    return calls


def textContent(prompt: str, text: str) -> str:
    """The user message of /api/text: the instruction, then the text clearly delimited as data."""
    return f"{prompt}\n\n<text>\n{text}\n</text>" if text else prompt


def textCall(settings: Settings, resolved: ResolvedModel, fields: Any, schema: Any,
             tokens: TokenEstimator | None = None) -> ModelCall:
    system = systemMessages(fields)
    content = textContent(fields.prompt, fields.text)
    payload = chatPayload(settings, resolved, [*system, {"role": "user", "content": content}],
                          temperature=fields.temperature, maxTokens=fields.maxTokens, schema=schema)
    return measuredCall(tokens or TokenEstimator(), resolved, [], payload, [])


def _contentPieces(answer: Answer, content: str, done: bool) -> list[tuple[str, str]]:
    """Content with a leading <think>...</think> moved to the reasoning (upstream/thinkSplit.py)."""
    reasoning, text = answer.splitter.feed(content)
    if done:
        lateReasoning, lateText = answer.splitter.flush()
        reasoning, text = reasoning + lateReasoning, text + lateText
    pieces = []
    if reasoning:
        answer.thinkingParts.append(reasoning)
        pieces.append(("thinking", reasoning))
    if text:
        answer.parts.append(text)
        pieces.append(("content", text))
    return pieces


async def readStream(stream: PrimedStream | BufferedStream, usage: Usage, answer: Answer,
                     call: ModelCall | None = None) -> AsyncIterator[tuple[str, str]]:
    """("content" | "thinking", text) pieces of one Ollama stream; fills the answer and the usage."""
    try:
        async for chunk in stream.chunks():
            message = chunk.get("message") or {}
            if message.get("thinking"):
                answer.thinkingParts.append(message["thinking"])
                yield "thinking", message["thinking"]
            for kind, piece in _contentPieces(answer, message.get("content") or "", bool(chunk.get("done"))):
                yield kind, piece
            if chunk.get("done"):
                answer.doneReason = str(chunk.get("done_reason") or "stop")
                usage.add(chunk)
                if call is not None and call.measure is not None:
                    call.measure.observe(call.measure.estimator, chunk)
    finally:
        usage.modelSeconds += stream.upstreamSeconds or 0.0


async def collectAnswer(ollama: RoutedOllama, call: ModelCall, externalName: str, usage: Usage) -> Answer:
    """The whole answer to one call (read from Ollama's stream to its end first, so a failing upstream can be
    replaced by another one: nothing has reached the client yet)."""
    answer = Answer(call.pages)
    stream = await ollama.openWholeStream("/api/chat", call.payload, externalName)
    try:
        async for _ in readStream(stream, usage, answer, call):
            pass
    finally:
        await stream.aclose()
    leaked, text = splitThinking(answer.text, leaked=True)  # deepseek-r1's lone </think> (ollama#10964)
    if leaked:
        answer.thinkingParts.append(leaked)
        answer.parts = [text]
    return answer


def _schemaMismatch(answer: Answer, problem: str) -> ServiceError:
    hint = (" The answer was cut off by the token limit (maxTokens); allow more tokens."
            if answer.doneReason == "length" else "")
    return ServiceError(422, f"The model's answer does not match the schema after one repair attempt: {problem}."
                        + hint, code="schema_mismatch",
                        extra={"rawAnswer": answer.text, "validationError": problem, "doneReason": answer.doneReason})


async def answerWithSchema(ollama: RoutedOllama, call: ModelCall, externalName: str, usage: Usage,
                           schema: Any) -> Answer:
    """An answer validated against the schema: one repair retry with the problem named, then 422 with the raw
    answer."""
    answer = await collectAnswer(ollama, call, externalName, usage)
    value, problem = validateAnswer(answer.text, schema)
    if problem is not None:
        messages = [*call.payload["messages"], {"role": "assistant", "content": answer.text},
                    {"role": "user", "content": repairPrompt(problem, schema)}]
        retry = ModelCall(call.pages, {**call.payload, "messages": messages})
        answer = await collectAnswer(ollama, retry, externalName, usage)
        value, problem = validateAnswer(answer.text, schema)
        if problem is not None:
            raise _schemaMismatch(answer, problem)
    answer.value = value
    return answer


async def answerAll(ollama: RoutedOllama, calls: list[ModelCall], externalName: str, usage: Usage,
                    schema: Any) -> list[Answer]:
    """Every call's answer, one after another (Ollama serves one model's requests in turn anyway)."""
    answers = []
    for call in calls:
        if schema is None:
            answers.append(await collectAnswer(ollama, call, externalName, usage))
        else:
            answers.append(await answerWithSchema(ollama, call, externalName, usage, schema))
    return answers


def pageMarker(pages: list[int]) -> str:
    if len(pages) == 1:
        return f"--- Page {pages[0]} ---"
    return f"--- Pages {pages[0]}-{pages[-1]} ---" if pages == list(range(pages[0], pages[-1] + 1)) \
        else f"--- Pages {', '.join(map(str, pages))} ---"


def combinedAnswer(answers: list[Answer], schema: Any) -> Any:
    """One answer: the single call's, or the page groups' texts joined with page markers (a list of parsed
    values with a schema)."""
    if len(answers) == 1:
        return answers[0].value if schema is not None else answers[0].text
    if schema is not None:
        return [answer.value for answer in answers]
    return "\n\n".join(f"{pageMarker(answer.pages)}\n{answer.text}" for answer in answers)


def doneReasonOf(answers: list[Answer]) -> str:
    """"length" when any answer was cut off by the token limit, else the last answer's reason."""
    if any(answer.doneReason == "length" for answer in answers):
        return "length"
    return answers[-1].doneReason if answers else "stop"


async def streamCalls(ollama: RoutedOllama, calls: list[ModelCall], externalName: str, usage: Usage,
                      answers: list[Answer], grouped: bool) -> AsyncIterator[dict[str, Any]]:
    """Events of a streamed answer: ``queued`` (position) while a call waits for its admission slot longer than
    ``[ollama] queue_notice_seconds``, ``ready`` once Ollama accepted the first call (so errors before it are plain
    HTTP errors), ``page`` before each page group when pages are answered one by one, ``delta``/``thinking``
    pieces. Fills ``answers`` for the final event."""
    for index, call in enumerate(calls):
        ticket = ollama.enqueue("/api/chat", call.payload, None)
        positions = ollama.queuedPositions(ticket, ollama.queueNoticeSeconds)
        try:
            async for position in positions:
                yield {"type": "queued", "position": position}
        finally:
            await positions.aclose()
        stream = await ollama.openStream("/api/chat", call.payload, externalName, ticket=ticket)
        answer = Answer(call.pages)
        try:
            if index == 0:
                yield {"type": "ready"}
            if grouped:
                yield {"type": "page", "pages": call.pages, "marker": pageMarker(call.pages)}
            async for kind, piece in readStream(stream, usage, answer, call):
                yield {"type": "delta" if kind == "content" else "thinking", "text": piece}
        finally:
            await stream.aclose()
        answers.append(answer)
