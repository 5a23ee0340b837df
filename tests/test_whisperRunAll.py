"""``make run`` (runAll.py) starts the whisper service beside the main service and stops both; a whisper that
cannot load its model leaves the main service running without poweron-transcribe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, REPO_ROOT, TEST_INI, assertNoNetworkViolation, freePort, guardedEnv, waitForHttp
from tests.whisperSupport import TINY_EN_DIR

pytestmark = pytest.mark.e2e


def startRunAll(tmp_path: Path, model: str) -> tuple[subprocess.Popen, int, int, Path]:
    mainPort, whisperPort = freePort(), freePort()
    ini = tmp_path / "config.ini"
    ini.write_text(TEST_INI, encoding="utf-8")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PRIVATE_LLM_")}
    env = guardedEnv({**environment, "PRIVATE_LLM_CONFIG": str(ini), "HF_HUB_OFFLINE": "1",
                      "PRIVATE_LLM_SERVER__PORT": str(mainPort), "PRIVATE_LLM_WHISPER__ENABLED": "true",
                      "PRIVATE_LLM_WHISPER__PORT": str(whisperPort),
                      "PRIVATE_LLM_WHISPER__BASE_URL": f"http://127.0.0.1:{whisperPort}",
                      "PRIVATE_LLM_WHISPER__MODEL": model, "PRIVATE_LLM_WHISPER__DEVICE": "cpu",
                      "PRIVATE_LLM_WHISPER__CPU_THREADS": "2"})
    logPath = tmp_path / "runAll.log"
    with open(logPath, "wb") as log:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "runAll.py")], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    return process, mainPort, whisperPort, logPath


def waitFor(condition, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def healthOf(port: int) -> dict:
    """The detailed health (models, whisper) a key may see; the public one says reachable/unreachable only."""
    return httpx.get(f"http://127.0.0.1:{port}/health", headers={"X-API-Key": API_KEY}, timeout=5).json()


@pytest.mark.stt
def test_runAllStartsBothAndStopsBoth(tmp_path: Path) -> None:
    process, mainPort, whisperPort, logPath = startRunAll(tmp_path, str(TINY_EN_DIR))
    try:
        waitForHttp(f"http://127.0.0.1:{whisperPort}/health", timeout=120, process=process)
        waitForHttp(f"http://127.0.0.1:{mainPort}/health/liveliness", timeout=60, process=process)
        assert waitFor(lambda: "poweron-transcribe" in healthOf(mainPort)["models"]["names"])
    finally:
        process.send_signal(signal.SIGTERM)
        returnCode = process.wait(60)
    assert returnCode == 0
    for port in (mainPort, whisperPort):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assertNoNetworkViolation(logPath.read_text(errors="replace"))


def test_mainServiceRunsOnWhenWhisperHasNoModel(tmp_path: Path) -> None:
    process, mainPort, _, logPath = startRunAll(tmp_path, "large-v3-turbo")
    try:
        waitForHttp(f"http://127.0.0.1:{mainPort}/health/liveliness", timeout=60, process=process)
        assert waitFor(lambda: "speech-to-text (poweron-transcribe) is unavailable" in logPath.read_text())
        assert process.poll() is None
        health = healthOf(mainPort)
        assert health["whisper"]["reachable"] is False and "poweron-transcribe" not in health["models"]["names"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    log = logPath.read_text(errors="replace")
    assert "cannot load the whisper model 'large-v3-turbo'" in log
    assertNoNetworkViolation(log)
