"""Rendering a finished transcription in OpenAI's response formats: json, text, srt, vtt and verbose_json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from whisperServer.languages import languageName

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
               "srt": "text/plain; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}


@dataclass(slots=True)
class TranscriptSegment:
    """One segment as OpenAI's verbose_json carries it (plain floats, 0-based id)."""

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
    words: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Transcript:
    """A finished transcription: task, language code, audio duration and segments."""

    task: str
    language: str
    duration: float
    segments: list[TranscriptSegment]

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments).strip()

    @property
    def languageName(self) -> str:
        """The language as OpenAI names it: the spoken one's English name ("german"); "english" for a
        translation (its text is English whatever was spoken)."""
        return "english" if self.task == "translate" else languageName(self.language)


def segmentFromWhisper(segment: Any, index: int, previousEnd: float) -> TranscriptSegment:
    """Convert a faster-whisper Segment (numpy floats, 1-based id); starts never go back before the previous end."""
    start = max(float(segment.start), previousEnd)
    end = max(float(segment.end), start)
    words = [{"word": word.word, "start": round(float(word.start), 3), "end": round(float(word.end), 3)}
             for word in (segment.words or ())]
    return TranscriptSegment(
        id=index, seek=int(segment.seek), start=round(start, 3), end=round(end, 3), text=segment.text,
        tokens=[int(token) for token in segment.tokens], temperature=float(segment.temperature or 0.0),
        avg_logprob=float(segment.avg_logprob), compression_ratio=float(segment.compression_ratio),
        no_speech_prob=float(segment.no_speech_prob), words=words)


def formatTimestamp(seconds: float, decimalMarker: str) -> str:
    """``HH:MM:SS,mmm`` (srt) or ``HH:MM:SS.mmm`` (vtt)."""
    milliseconds = max(0, round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimalMarker}{milliseconds:03d}"


def toSrt(transcript: Transcript) -> str:
    cues = [f"{number}\n{formatTimestamp(s.start, ',')} --> {formatTimestamp(s.end, ',')}\n{s.text.strip()}\n"
            for number, s in enumerate(transcript.segments, start=1)]
    return "\n".join(cues)


def toVtt(transcript: Transcript) -> str:
    cues = [f"{formatTimestamp(s.start, '.')} --> {formatTimestamp(s.end, '.')}\n{s.text.strip()}\n"
            for s in transcript.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def toVerboseJson(transcript: Transcript, withWords: bool) -> dict[str, Any]:
    segments = []
    for segment in transcript.segments:
        entry = {name: getattr(segment, name) for name in TranscriptSegment.__slots__ if name != "words"}
        segments.append(entry)
    body: dict[str, Any] = {"task": transcript.task, "language": transcript.languageName,
                            "duration": round(transcript.duration, 3), "text": transcript.text, "segments": segments}
    if withWords:
        body["words"] = [word for segment in transcript.segments for word in segment.words]
    if transcript.task == "transcribe":
        body["usage"] = usageOf(transcript.duration)
    return body


def usageOf(duration: float) -> dict[str, Any]:
    """OpenAI's duration usage object."""
    return {"type": "duration", "seconds": round(duration, 3)}


def renderTranscript(transcript: Transcript, responseFormat: str, withWords: bool = False) -> str | dict[str, Any]:
    """The body for ``responseFormat``: a dict for the JSON formats, a string for text, srt and vtt."""
    if responseFormat == "verbose_json":
        return toVerboseJson(transcript, withWords)
    if responseFormat == "text":
        return transcript.text + "\n" if transcript.text else ""
    if responseFormat == "srt":
        return toSrt(transcript)
    if responseFormat == "vtt":
        return toVtt(transcript)
    if transcript.task == "transcribe":
        return {"text": transcript.text, "usage": usageOf(transcript.duration)}
    return {"text": transcript.text}
