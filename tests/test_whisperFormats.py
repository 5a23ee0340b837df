"""Pieces of speech-to-text without the model: response formats, the admission queue, audio decoding, model
names (whisper-1) and the translation guard."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest

from config import WhisperSettings, resolveModel
from core.errors import ServiceError
from tests.whisperSupport import FAKE_PDF, silenceWav, toneWav
from whisperServer.engine import (
    AdmissionControl,
    TranscriptionJob,
    WhisperEngine,
    decodeAudio,
    resolveComputeType,
)
from whisperServer.languages import LANGUAGE_NAMES, languageCode, languageName
from whisperServer.transcriptFormats import (
    Transcript,
    TranscriptSegment,
    formatTimestamp,
    renderTranscript,
    segmentFromWhisper,
)


def segment(index: int, start: float, end: float, text: str) -> TranscriptSegment:
    return TranscriptSegment(id=index, seek=0, start=start, end=end, text=text, tokens=[1, 2], temperature=0.0,
                             avg_logprob=-0.2, compression_ratio=1.1, no_speech_prob=0.01,
                             words=[{"word": text.split()[0], "start": start, "end": start + 0.3}])


TRANSCRIPT = Transcript(task="transcribe", language="en", duration=3725.5,
                        segments=[segment(0, 0.0, 1.5, " Hello there."), segment(1, 3723.25, 3725.1, " Goodbye.")])


def test_timestampsUseTheSubtitleLayouts() -> None:
    assert formatTimestamp(3723.25, ",") == "01:02:03,250"
    assert formatTimestamp(0.0004, ".") == "00:00:00.000"
    assert formatTimestamp(59.9996, ".") == "00:01:00.000"


def test_srtAndVttCues() -> None:
    assert renderTranscript(TRANSCRIPT, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:02:03,250 --> 01:02:05,100\nGoodbye.\n")
    assert renderTranscript(TRANSCRIPT, "vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n01:02:03.250 --> 01:02:05.100\nGoodbye.\n")


def test_jsonTextAndVerboseJson() -> None:
    assert renderTranscript(TRANSCRIPT, "json") == {"text": "Hello there. Goodbye.",
                                                    "usage": {"type": "duration", "seconds": 3725.5}}
    assert renderTranscript(TRANSCRIPT, "text") == "Hello there. Goodbye.\n"
    verbose = renderTranscript(TRANSCRIPT, "verbose_json", withWords=True)
    assert verbose["segments"][1] == {"id": 1, "seek": 0, "start": 3723.25, "end": 3725.1, "text": " Goodbye.",
                                      "tokens": [1, 2], "temperature": 0.0, "avg_logprob": -0.2,
                                      "compression_ratio": 1.1, "no_speech_prob": 0.01}
    assert verbose["words"] == [{"word": "Hello", "start": 0.0, "end": 0.3}, {"word": "Goodbye.", "start": 3723.25,
                                                                              "end": 3723.55}]
    assert "words" not in renderTranscript(TRANSCRIPT, "verbose_json")
    assert verbose["language"] == "english" and verbose["task"] == "transcribe"


def test_verboseJsonNamesTheLanguageAsOpenAiDoes() -> None:
    """OpenAI's verbose_json carries the language's English name; a translation's text is always English."""
    german = Transcript(task="transcribe", language="de", duration=2.0, segments=[segment(0, 0.0, 1.9, " Grüße.")])
    assert renderTranscript(german, "verbose_json")["language"] == "german"
    translated = Transcript(task="translate", language="de", duration=2.0, segments=[])
    assert renderTranscript(translated, "verbose_json")["language"] == "english"
    assert languageName("haw") == "hawaiian" and languageName("yue") == "cantonese" and languageName("xx") == "xx"
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(LANGUAGE_NAMES) == set(_LANGUAGE_CODES), "a name for every language faster-whisper can report"
    assert len(set(LANGUAGE_NAMES.values())) == len(LANGUAGE_NAMES)


@pytest.mark.parametrize("value", ["de", "DE", " de ", "de-DE", "de_AT", "German"])
def test_languageCodesAreUnderstoodInTheirUsualSpellings(value: str) -> None:
    assert languageCode(value) == "de"


def test_unknownLanguageSpellingsStayAsTheyAre() -> None:
    assert languageCode("klingon") == "klingon" and languageCode("haw") == "haw" and languageCode("zh-TW") == "zh"


def test_translationsCarryNoUsageAndEmptyTranscriptsStayEmpty() -> None:
    translated = Transcript(task="translate", language="de", duration=2.0, segments=[])
    assert renderTranscript(translated, "json") == {"text": ""}
    assert renderTranscript(translated, "text") == "" and renderTranscript(translated, "srt") == ""


def test_whisperSegmentsBecomePlainFloatsThatNeverGoBack() -> None:
    raw = SimpleNamespace(seek=np.int64(0), start=np.float64(4.1), end=np.float64(6.0), text=" Hi", tokens=[5],
                          temperature=0.0, avg_logprob=np.float64(-0.1), compression_ratio=1.0, no_speech_prob=0.0,
                          words=[SimpleNamespace(word=" Hi", start=np.float64(4.1), end=np.float64(4.5))])
    converted = segmentFromWhisper(raw, 3, previousEnd=4.3)
    assert converted.id == 3 and converted.start == 4.3 and converted.end == 6.0
    assert type(converted.start) is float and type(converted.words[0]["end"]) is float


def test_admissionAllowsRunningPlusQueuedThen503() -> None:
    admission = AdmissionControl(maxConcurrent=2, maxQueue=1)
    for _ in range(3):
        admission.admit()
    assert (admission.running, admission.waiting) == (2, 1)
    with pytest.raises(ServiceError) as busy:
        admission.admit()
    assert busy.value.status == 503 and busy.value.headers["Retry-After"] == "5"
    admission.release()
    admission.admit()
    assert admission.admitted == 3


def test_decodeGives16kHzMonoFloats() -> None:
    samples = decodeAudio(io.BytesIO(toneWav(1.0)), maxSeconds=60)
    assert samples.dtype == np.float32 and abs(samples.shape[0] - 16_000) <= 32
    assert 0.25 < float(np.abs(samples).max()) < 0.35


@pytest.mark.parametrize("content, status, code", [
    (FAKE_PDF, 415, "unsupported_audio"),
    (silenceWav(1.0)[:44], 400, "empty_audio"),
    (b"", 415, "unsupported_audio"),
])
def test_decodeRefusesWhatIsNotAudio(content: bytes, status: int, code: str) -> None:
    with pytest.raises(ServiceError) as refused:
        decodeAudio(io.BytesIO(content), maxSeconds=60)
    assert (refused.value.status, refused.value.code) == (status, code)


def test_decodeStopsAtTheDurationLimit() -> None:
    with pytest.raises(ServiceError) as tooLong:
        decodeAudio(io.BytesIO(silenceWav(3.0)), maxSeconds=2)
    assert tooLong.value.status == 413 and "2 seconds" in tooLong.value.message


def test_whisper1IsAnAliasOfTranscribe(makeSettings) -> None:
    settings = makeSettings()
    assert resolveModel(settings, "whisper-1") is resolveModel(settings, "poweron-transcribe")
    assert "whisper-1" not in settings.modelMapping


def test_turboModelsRefuseToTranslate() -> None:
    assert "cannot translate" in WhisperEngine(WhisperSettings(model="large-v3-turbo")).translationProblem()
    assert WhisperEngine(WhisperSettings(model="large-v3-turbo", translation_model="large-v3")).translationProblem() \
        is None
    assert resolveComputeType("default", "cuda") == "float16" and resolveComputeType("default", "cpu") == "int8"


class EnglishOnlyModel:
    """Stands in for a loaded tiny.en: faster-whisper reports ``supported_languages == ["en"]`` for it."""

    name = "/models/tiny.en"
    supportedLanguages = frozenset({"en"})
    isLoaded = True

    def ensureLoaded(self) -> None:
        pass


ENGLISH_ONLY_REFUSAL = ("Translation is not available: the model /models/tiny.en is English-only and cannot translate "
                        "(it transcribes English speech only); set [whisper] translation_model to a multilingual "
                        "model, e.g. large-v3")


def test_englishOnlyModelsRefuseToTranslate() -> None:
    """tiny.en would answer German speech with English-sounding words: translations are refused like turbo's."""
    engine = WhisperEngine(WhisperSettings(model="/models/tiny.en"))
    engine.models["/models/tiny.en"] = EnglishOnlyModel()  # type: ignore[assignment]
    assert engine.translationProblem() == ENGLISH_ONLY_REFUSAL
    multilingual = WhisperEngine(WhisperSettings(model="/models/base"))
    multilingual.models["/models/base"] = SimpleNamespace(supportedLanguages=frozenset({"en", "de"}))  # type: ignore
    assert multilingual.translationProblem() is None


def test_anEnglishOnlyTranslationModelIsRefusedOnceLoaded() -> None:
    """A translation_model loaded on first use: the worker refuses it after loading, before any decoding."""
    engine = WhisperEngine(WhisperSettings(model="/models/base", translation_model="/models/tiny.en"))
    assert engine.translationProblem() is None  # not loaded yet: nothing known
    engine.models["/models/tiny.en"] = EnglishOnlyModel()  # type: ignore[assignment]
    with pytest.raises(ServiceError) as refused:
        engine._run(TranscriptionJob(task="translate", audio=io.BytesIO(silenceWav(1.0))), None)
    assert (refused.value.status, refused.value.code) == (501, "translation_unavailable")
    assert refused.value.message == ENGLISH_ONLY_REFUSAL and engine.active == 0
