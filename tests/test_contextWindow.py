"""Unit tests of the pieces behind issue 15: daemon versions, one window per model, the prompt estimate and its
calibration, the grammar check of schemas and reasoning left in content."""

from __future__ import annotations

import pytest

from config import MODEL_MAPPING
from core.errors import ServiceError
from upstream.contextWindow import TokenEstimator, checkFits, imageTokens, modelWindow
from upstream.ollamaVersion import QWEN25VL_OLD_PIXELS, OllamaFeatures, imagePixelBudget, parseVersion
from upstream.schemaGrammar import checkGrammar, grammarProblem
from upstream.thinkSplit import ThinkSplitter, splitThinking

TEXT = MODEL_MAPPING["poweron-text-general"]
VISION = MODEL_MAPPING["poweron-vision-general"]


@pytest.mark.parametrize("text, version", [("0.12.6", (0, 12, 6)), ("v0.33.0-rc2", (0, 33, 0)), ("0.13", (0, 13, 0)),
                                           ("", (0, 0, 0)), ("junk", (0, 0, 0)), ("0.12.10+cuda", (0, 12, 10))])
def test_parseVersion(text, version):
    assert parseVersion(text) == version


def test_featuresFollowTheReleasesThatIntroducedThem():
    assert not OllamaFeatures.of("0.12.5").truncateFlag and OllamaFeatures.of("0.12.6").truncateFlag
    assert not OllamaFeatures.of("0.12.3").thinksByDefault and OllamaFeatures.of("0.12.4").thinksByDefault
    assert not OllamaFeatures.of("0.32.13").decodesWebp and OllamaFeatures.of("0.32.14").decodesWebp
    assert OllamaFeatures.of(None).label == "unknown"


def test_qwenPixelBudgetByVersion():
    assert imagePixelBudget(2_097_152, "qwen2.5vl:7b", OllamaFeatures.of("0.13.3")) == QWEN25VL_OLD_PIXELS
    assert imagePixelBudget(2_097_152, "qwen2.5vl:7b", OllamaFeatures.of("0.13.4")) == 2_097_152
    assert imagePixelBudget(1_500_000, "granite3.2-vision", OllamaFeatures.of("0.12.0")) == 1_500_000


def test_modelWindow(makeSettings):
    settings = makeSettings(ollama={"num_ctx": 8192})
    assert modelWindow(settings, TEXT, 32768, vision=False) == 8192
    assert modelWindow(settings, TEXT, 2048, vision=False) == 2048  # the model's own length caps it
    assert modelWindow(settings, TEXT, 0, vision=False) == 8192  # unknown length: as configured
    small = makeSettings(ollama={"num_ctx": 1024})
    assert modelWindow(small, VISION, 128000, vision=True) == 2048  # Ollama's minimum for vision models
    assert modelWindow(makeSettings(ollama={"num_ctx": 0}), TEXT, 32768, vision=False) == 0


def test_perModelNumCtxWins(makeSettings):
    settings = makeSettings(ollama={"num_ctx": 8192},
                            models={"poweron-text-general": "ollama=qwen2.5:7b; type=text; num_ctx=16384"})
    assert modelWindow(settings, settings.modelMapping["poweron-text-general"], 32768, vision=False) == 16384


def test_estimateIsConservativeAndCalibrates():
    tokens = TokenEstimator()
    assert tokens.textTokens("m", 3000) == 1100  # 3 characters per token + 10 %
    for _ in range(10):
        tokens.observe("m", chars=4000, messages=1, imageTokens=0, reported=1008, window=8192)  # 4 chars/token
    assert 3.9 < tokens.ratio("m") <= 4.0
    tokens.observe("m", chars=4000, messages=1, imageTokens=0, reported=8192, window=8192)  # maybe cut: skipped
    tokens.observe("m", chars=50, messages=1, imageTokens=0, reported=20, window=8192)  # too short: skipped
    assert tokens.samples["m"] == 10
    tokens.observe("x", chars=1000, messages=0, imageTokens=0, reported=5000, window=8192)
    assert tokens.ratio("x") == 1.5  # clamped


def test_imageTokens():
    assert imageTokens("qwen2.5vl:7b", 784 * 100, OllamaFeatures.of("0.33.0")) == 102
    assert imageTokens("qwen2.5vl:7b", None, OllamaFeatures.of("0.13.3")) == 1280 + 2  # unknown size: the most
    assert imageTokens("llama3.2-vision", 10**6, OllamaFeatures.of("0.33.0")) == 768


def test_checkFitsSpeaksEachApisLanguage():
    checkFits(8192, 6000, 2000, "m", openAi=True)
    with pytest.raises(ServiceError) as v1:
        checkFits(8192, 7000, 2000, "m", openAi=True)
    assert (v1.value.status, v1.value.code, v1.value.param) == (400, "context_length_exceeded", "messages")
    with pytest.raises(ServiceError) as api:
        checkFits(8192, 7000, 2000, "m", openAi=False)
    assert api.value.extra == {"contextWindow": 8192, "promptTokens": 7000, "answerTokens": 2000}


@pytest.mark.parametrize("schema, problem", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^[0-9]+$"}}}, None),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "[0-9]+"}}},
     ("#/properties/a", "pattern")),
    ({"type": "object", "properties": {"a": {"description": "no type"}}}, ("#/properties/a", "type")),
    ({"type": "object", "properties": {"a": {}}}, None),  # empty schema: any value
    ({"type": "object", "properties": {"a": {"enum": [1, 2]}, "b": {"const": "x"}}}, None),
    ({"type": "array", "items": {"type": "strng"}}, ("#/items", "type")),
    ({"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"}, None),
    ({"$defs": {"x": {"title": "untyped"}}, "$ref": "#/$defs/x"}, ("#/$defs/x", "type")),  # visited via the ref
    ({"type": "object", "properties": {"a": {"$ref": "https://example.org/s.json"}}}, ("#/properties/a", "$ref")),
    ({"anyOf": [{"type": "string"}, {"pattern": "x"}]}, ("#/anyOf/1", "pattern")),
    ({"type": ["string", "null"], "maxLength": 5}, None),
])
def test_grammarProblem(schema, problem):
    found = grammarProblem(schema)
    assert (found[:2] if found else None) == problem


def test_checkGrammarNamesTheKeyword():
    with pytest.raises(ServiceError) as error:
        checkGrammar({"type": "object", "properties": {"iban": {"type": "string", "pattern": "DE[0-9]+"}}}, "0.12.10")
    assert error.value.code == "unsupported_schema" and error.value.extra["keyword"] == "pattern"
    assert "`pattern` at #/properties/iban" in error.value.message


def test_splitThinking():
    assert splitThinking("<think>\nwhy\n</think>\n\nAnswer") == ("why", "Answer")
    assert splitThinking("  <think>unfinished") == ("unfinished", "")
    assert splitThinking("Answer with </think> inside") == ("", "Answer with </think> inside")
    assert splitThinking("leaked trace</think>\n\nAnswer", leaked=True) == ("leaked trace", "Answer")


def feed(splitter: ThinkSplitter, pieces: list[str]) -> tuple[str, str]:
    reasoning = content = ""
    for piece in pieces:
        more, text = splitter.feed(piece)
        reasoning, content = reasoning + more, content + text
    more, text = splitter.flush()
    return reasoning + more, content + text


@pytest.mark.parametrize("pieces, expected", [
    (["<th", "ink>a b", " c</th", "ink>", "\n\nAns", "wer"], ("a b c", "Answer")),
    (["Plain", " answer"], ("", "Plain answer")),
    (["<", "b>bold</b>"], ("", "<b>bold</b>")),
    (["<think>never closed"], ("never closed", "")),
])
def test_thinkSplitterStreams(pieces, expected):
    assert feed(ThinkSplitter(), pieces) == expected


def test_thinkSplitterAfterThinkFalse():
    assert feed(ThinkSplitter(leaked=True), ["trace ", "here</think>", "\n\nAnswer"]) == ("trace here", "Answer")
    assert feed(ThinkSplitter(leaked=True), ["Just ", "an answer"]) == ("", "Just an answer")
