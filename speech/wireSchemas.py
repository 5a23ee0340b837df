"""Wire schemas of /v1/audio/transcriptions and /v1/audio/translations (answered by the whisper service)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from core.wire import (
    OPENAI_MODEL_ERRORS,
    OpenAiError,
    OpenWireModel,
    WireModel,
    anyOf,
    multipartOf,
    omitted,
    operationDoc,
    sseContent,
    textPlain,
)


class TranscriptionForm(OpenWireModel):
    """OpenAI's audio upload (multipart/form-data), validated by the speech-to-text service."""

    file: bytes = Field(description="The recording (mp3, wav, ogg, m4a, webm, flac, ...)")
    model: str = Field(description="poweron-transcribe (whisper-1 is an alias)", examples=["poweron-transcribe"])
    language: str | None = Field(None, description="ISO-639-1 code (de; de-DE and german are understood too); "
                                 "empty: detected. Transcriptions only", examples=["de"])
    prompt: str | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = Field(None, description="0: whisper's fallback ladder")
    response_format: Literal["json", "text", "srt", "vtt", "verbose_json"] | None = None
    stream: bool | None = Field(None, description="SSE transcript.text.* events; json and text only")
    timestamp_granularities: list[Literal["segment", "word"]] | None = Field(
        None, alias="timestamp_granularities[]", description="word needs verbose_json")


class DurationUsage(WireModel):
    type: Literal["duration"]
    seconds: float


class Transcription(WireModel):
    text: str
    usage: DurationUsage = omitted("Transcriptions only")


class TranscriptWord(WireModel):
    word: str
    start: float
    end: float


class TranscriptSegment(WireModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class VerboseTranscription(WireModel):
    task: Literal["transcribe", "translate"]
    language: str = Field(description="The language's English name as OpenAI gives it (german, french, english); "
                          "english for translations", examples=["german"])
    duration: float
    text: str
    segments: list[TranscriptSegment]
    words: list[TranscriptWord] = omitted("With timestamp_granularities[]=word")
    usage: DurationUsage = omitted("Transcriptions only")


class TranscriptDelta(WireModel):
    type: Literal["transcript.text.delta"]
    delta: str


class TranscriptDone(WireModel):
    type: Literal["transcript.text.done"]
    text: str
    language: str = Field(description="PowerOn extension: the detected (or given) language's English name, e.g. "
                          "german; english for translations", examples=["german"])


def audioDoc(task: str) -> dict[str, Any]:
    """/v1/audio/transcriptions and /translations: forwarded to the speech-to-text service, which answers."""
    ok = {"application/json": {"schema": anyOf((Transcription, VerboseTranscription))}, **textPlain(),
          "text/vtt": {"schema": {"type": "string"}},
          "text/event-stream": sseContent((TranscriptDelta, TranscriptDone, OpenAiError))}
    errors = (*OPENAI_MODEL_ERRORS, 415) if task == "transcribe" else (*OPENAI_MODEL_ERRORS, 415, 501)
    return operationDoc(ok, errors, OpenAiError, multipartOf(TranscriptionForm),
                        "json/verbose_json, text/srt (text/plain), vtt, or SSE events with stream")
