"""Shared fixtures: test settings, the Ollama stub, and the real service started as a process on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import Settings, loadSettings
from tests.networkGuard import NATIVE_TELEMETRY_OFF, VIOLATION_MARKER, NetworkGuard

os.environ.update(NATIVE_TELEMETRY_OFF)  # before anything imports onnxruntime (pymupdf does)
NETWORK_GUARD = NetworkGuard().install()
"""Loopback-only guard for this process (tests/networkGuard.py); processes started by tests get it via guardedEnv."""
SUBPROCESS_GUARD_DIR = Path(__file__).resolve().parent / "subprocessGuard"

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY_NAME, API_KEY = "gateway", "test-analysis-key-0123456789"
OPENAI_KEY_NAME, OPENAI_KEY = "cursor", "test-openai-key-9876543210"
OTHER_OPENAI_KEY_NAME, OTHER_OPENAI_KEY = "kiva", "test-openai-key-kiva-555"
DEAD_OLLAMA_URL = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused at once

TEST_INI = f"""
[auth]
api_keys = {API_KEY_NAME}={API_KEY}
openai_keys = {OPENAI_KEY_NAME}={OPENAI_KEY}, {OTHER_OPENAI_KEY_NAME}={OTHER_OPENAI_KEY}

[ollama]
base_url = {DEAD_OLLAMA_URL}
discovery_ttl = 0.5
; the stub runs every request at once unless told otherwise (maxParallel); admission tests set their own slots
num_parallel = 1024
num_parallel_per_model = poweron-embed=1024
max_queue = 1024

[whisper]
base_url = http://127.0.0.1:9
enabled = false

[warmup]
models =
"""


def guardedEnv(env: dict[str, str]) -> dict[str, str]:
    """Environment for a Python process started by a test: installs the loopback-only network guard in it."""
    paths = [str(SUBPROCESS_GUARD_DIR), env.get("PYTHONPATH", "")]
    return {**env, **NATIVE_TELEMETRY_OFF, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def assertNoNetworkViolation(logText: str) -> None:
    """Fail when a process started with guardedEnv tried to reach something other than loopback."""
    violations = [line for line in logText.splitlines() if VIOLATION_MARKER in line]
    assert not violations, "outbound network access attempted:\n" + "\n".join(violations[:5])


@pytest.fixture(autouse=True)
def _noSwallowedNetworkViolation() -> Iterator[None]:
    """Fails a test whose code tried to leave the machine even if something caught the guard's error."""
    NETWORK_GUARD.violations.clear()
    yield
    violations, NETWORK_GUARD.violations[:] = list(NETWORK_GUARD.violations), []
    if violations:
        pytest.fail("outbound network access attempted:\n" + "\n".join(violations[:5]), pytrace=False)


def freePort() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def testIni(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config.ini with test keys; PRIVATE_LLM_CONFIG points at it; no PRIVATE_LLM_* variables leak in."""
    for name in list(os.environ):
        if name.startswith("PRIVATE_LLM_"):
            monkeypatch.delenv(name)
    path = tmp_path / "config.ini"
    path.write_text(TEST_INI, encoding="utf-8")
    monkeypatch.setenv("PRIVATE_LLM_CONFIG", str(path))
    return path


@pytest.fixture
def makeSettings(testIni: Path):
    """Factory: settings from the test INI with keyword overrides per section, e.g. ollama={"base_url": ...}."""

    def factory(**overrides: Any) -> Settings:
        return loadSettings(**overrides)

    return factory


def waitForHttp(url: str, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stopProcess(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if the process has not ended within ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def childPids(pid: int) -> set[int]:
    """Direct and indirect children of a process (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, pending = set(), [pid]
    while pending:
        current = pending.pop()
        children = {child for child, parent in parents.items() if parent == current} - found
        found |= children
        pending.extend(children)
    return found


class ServiceProcess:
    """The real service (``python app.py``) as a subprocess on 127.0.0.1 with a given environment."""

    def __init__(self, iniPath: Path, env: dict[str, str] | None = None, logPath: Path | None = None) -> None:
        self.port = freePort()
        self.baseUrl = f"http://127.0.0.1:{self.port}"
        self.env = guardedEnv({**os.environ, "PRIVATE_LLM_CONFIG": str(iniPath),
                               "PRIVATE_LLM_SERVER__HOST": "127.0.0.1", "PRIVATE_LLM_SERVER__PORT": str(self.port),
                               **(env or {})})
        self.logPath = logPath or iniPath.with_name(f"service-{self.port}.log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        self.logFile = open(self.logPath, "wb")
        self.process = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py")], cwd=REPO_ROOT, env=self.env,
                                        stdout=self.logFile, stderr=subprocess.STDOUT)
        waitForHttp(self.baseUrl + "/health/liveliness", timeout, self.process)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        stopProcess(self.process, timeout)
        self.logFile.close()
        return self.process.returncode if self.process else None

    def logText(self) -> str:
        return self.logPath.read_text(encoding="utf-8", errors="replace")

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def stub() -> Iterator[Any]:
    """An Ollama stub with the default models, one per test module (modules may define their own)."""
    from tests.ollamaStub import StubServer

    with StubServer() as server:
        yield server


@pytest.fixture
def stubControl(stub: Any) -> Iterator[httpx.Client]:
    """A client for the stub's control API (and its Ollama routes); the stub is reset first."""
    with httpx.Client(base_url=stub.baseUrl, timeout=15.0) as control:
        control.post("/_stub/reset").raise_for_status()
        yield control


@pytest.fixture
def serviceFactory(testIni: Path) -> Iterator[Any]:
    """Start real service processes with extra environment; all are stopped at the end of the test."""
    started: list[ServiceProcess] = []

    def factory(env: dict[str, str] | None = None) -> ServiceProcess:
        service = ServiceProcess(testIni, env).start()
        started.append(service)
        return service

    yield factory
    for service in started:
        service.stop()
    for service in started:
        assertNoNetworkViolation(service.logText())
