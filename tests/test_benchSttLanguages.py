"""bench/sttLanguages.py in ``make bench``: its per-language summary on canned rows, its place among bench/run.py's
extra benches and in the report, and a quick smoke run of the real thing (espeak-ng German and English through the
multilingual base and tiny.en, BENCH_QUICK: one speaking rate) whose JSON and markdown must have every language's
detection accuracy, word error rate and real-time factor, so the bench cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench import report
from bench.run import EXTRA_BENCHES
from bench.sttLanguages import languageSummary, markdownTable, optionsFromEnv
from tests.conftest import REPO_ROOT, assertNoNetworkViolation, guardedEnv
from tests.test_bench import cannedResults

SMOKE_TIMEOUT_SECONDS = 300
SECTION = "## Speech to text in the users' languages (detection, WER, real-time factor)"
SUMMARY_HEADER = ("| Model | Language | Detected right (mean p) | WER, language given: mean (worst clip) "
                  "| WER, detected | Real-time factor, given / detected |")


def row(code: str, rate: int, detected: str, werGiven: float, rtfGiven: float) -> dict:
    return {"language": code, "rate": rate, "seconds": 10.0, "detected": detected, "probability": 0.8,
            "werDetected": werGiven + 0.1, "werGiven": werGiven, "wallDetected": rtfGiven * 12,
            "wallGiven": rtfGiven * 10, "rtfDetected": rtfGiven * 1.2, "rtfGiven": rtfGiven, "textGiven": "…"}


ROWS = [row("de", 130, "de", 0.10, 0.30), row("de", 150, "en", 0.20, 0.20), row("de", 170, "de", 0.30, 0.40),
        row("fr", 150, "fr", 0.25, 0.50)]


def test_languageSummary_detectionAccuracyMeanWerAndMedianRealTimeFactor() -> None:
    german, french = languageSummary(ROWS)
    assert (german["language"], german["clips"], german["detectedRight"]) == ("de", 3, 2)
    assert german["detectionAccuracy"] == pytest.approx(0.667)
    assert german["werGiven"] == pytest.approx(0.2) and german["werGivenWorst"] == pytest.approx(0.3)
    assert german["werDetected"] == pytest.approx(0.3) and german["rtfGiven"] == pytest.approx(0.3)
    assert french["detectedRight"] == 1 and french["rtfDetected"] == pytest.approx(0.6)


def test_markdownTable_summaryThenEveryClip() -> None:
    options = {"rates": [130, 150, 170], "device": "cpu", "computeType": "int8", "threads": 2, "quick": False}
    text = markdownTable({"base (multilingual)": ROWS}, options)
    assert SUMMARY_HEADER in text and "130 / 150 / 170 words per minute" in text and "Quick run" not in text
    assert "| base (multilingual) | de | 2 of 3 (0.80) | 20 % (30 %) | 30 % | 0.30 / 0.36 |" in text
    assert "| base (multilingual) | de | 150 | 10.0 s | en (0.80) | 30 % | 20 % | 2.0 s | 0.20 |" in text
    assert "Quick run (BENCH_QUICK)" in markdownTable({"base": ROWS}, {**options, "quick": True})


def test_optionsFromEnv_quickIsOneRateAndUnknownLanguagesAreRefused() -> None:
    full, quick = optionsFromEnv({}), optionsFromEnv({"BENCH_QUICK": "1"})
    assert full["rates"] == [130, 150, 170] and full["languages"] == ["de", "fr", "en", "it"] and not full["quick"]
    assert quick["rates"] == [150] and quick["quick"]
    assert optionsFromEnv({"BENCH_QUICK": "1", "BENCH_STT_RATES": "140,160"})["rates"] == [140, 160]
    with pytest.raises(ValueError, match="no clip for \\['es'\\]"):
        optionsFromEnv({"BENCH_STT_LANGUAGES": "de,es"})


def test_makeBenchRunsItAndReportsItsSection() -> None:
    assert ("sttLanguages", "bench.sttLanguages") in EXTRA_BENCHES
    results = cannedResults()
    results["extra"]["sttLanguages"] = {"markdown": "LANGUAGE TABLE", "results": {}}
    text = report.renderReport(results)
    assert f"{SECTION}\n\nLANGUAGE TABLE\n" in text
    assert text.index("## Speech to text\n") < text.index(SECTION)
    del results["extra"]["sttLanguages"]
    assert "Not measured: `bench/sttLanguages.py` is not there yet." in report.renderReport(results)


@pytest.mark.stt
@pytest.mark.e2e
def test_sttLanguagesSmoke_quickRunReportsEveryLanguage(tmp_path: Path) -> None:
    """``BENCH_QUICK=1 BENCH_STT_LANGUAGES=de,en python -m bench.sttLanguages`` (about a minute on two shared cores)."""
    out = tmp_path / "sttLanguages.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "PRIVATE_LLM_"))}
    env.update({"BENCH_QUICK": "1", "BENCH_STT_LANGUAGES": "de,en", "HF_HUB_OFFLINE": "1"})
    result = subprocess.run([sys.executable, "-m", "bench.sttLanguages", "--out", str(out)], cwd=REPO_ROOT,
                            env=guardedEnv(env), capture_output=True, text=True, timeout=SMOKE_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assertNoNetworkViolation(result.stdout + result.stderr)
    outcome = orjson.loads(out.read_bytes())
    assert outcome["quick"] and outcome["rates"] == [150] and set(outcome["summary"]) == {"base (multilingual)",
                                                                                        "tiny.en"}
    for model, summary in outcome["summary"].items():
        assert [s["language"] for s in summary] == ["de", "en"], model
        for entry in summary:
            assert entry["clips"] == 1 and 0 <= entry["detectionAccuracy"] <= 1 and entry["werGiven"] >= 0
            assert entry["rtfGiven"] > 0 and entry["rtfDetected"] > 0
    base = {s["language"]: s for s in outcome["summary"]["base (multilingual)"]}
    assert base["de"]["detectionAccuracy"] == 1 and base["en"]["detectionAccuracy"] == 1, base
    assert {s["language"]: s["detectedRight"] for s in outcome["summary"]["tiny.en"]} == {"de": 0, "en": 1}
    section = "\n".join(report.extraSection("sttLanguages", "Languages", outcome))
    assert SUMMARY_HEADER in section and "| base (multilingual) | de | 1 of 1 (" in section
    assert "Quick run (BENCH_QUICK)" in section and SUMMARY_HEADER in result.stdout
