"""SIGHUP with ``[server] workers = 2`` (the real ``python app.py``, a real redis-server, the Ollama stub): the parent
passes the signal on to every worker, each reloads config.ini in place like the single process does, so a stream in
flight runs to its end, the worker processes stay the same, and a rotated key works (the old one is refused) on both
workers; a bad file is refused by each worker and the running configuration stays.

Which worker answers is made certain by stopping the other one (SIGSTOP): a stopped worker does not accept, so every
new connection on the shared port goes to the one left running."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (OPENAI_KEY, OTHER_OPENAI_KEY, TEST_INI, ServiceProcess, assertNoNetworkViolation,
                            childPids)
from tests.redisServer import RedisServer, redisAvailable

needsRedis = pytest.mark.skipif(not redisAvailable(), reason="redis-server not installed (make test-deps)")

ROTATED_KEY = "test-openai-key-rotated-7777777777"
STREAM_CHUNKS, CHUNK_DELAY_MS = 40, 300  # a 12 s stream: in flight before the SIGHUP and after both reloads
WAIT_SECONDS = 60.0


def waitFor(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def workerPids(pid: int) -> set[int]:
    return {child for child in childPids(pid) if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()}


@pytest.fixture
def workers(tmp_path: Path, testIni: Path, stub, stubControl) -> Iterator[ServiceProcess]:
    """``python app.py`` with two workers, both started (their lifespans ran: the reload handler is installed)."""
    stubControl.post("/_stub/config", json={"numParallel": 8}).raise_for_status()
    with RedisServer(tmp_path) as redis:
        service = ServiceProcess(testIni, {"PRIVATE_LLM_SERVER__WORKERS": "2",
                                           "PRIVATE_LLM_STATE__REDIS_URL": redis.url,
                                           "PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl})
        pids: set[int] = set()
        try:
            service.start(timeout=120)
            waitFor(lambda: len(workerPids(service.process.pid)) == 2, "two worker processes", 120)
            pids = workerPids(service.process.pid)
            waitFor(lambda: service.logText().count("Application startup complete") == 2, "both workers started", 120)
            yield service
        finally:
            for pid in pids:  # never leave a worker stopped, whatever failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            service.stop(timeout=40)
            for pid in pids:  # a worker left behind by a supervisor that was killed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assertNoNetworkViolation(service.logText())


def sighup(service: ServiceProcess, iniText: str) -> None:
    Path(service.env["PRIVATE_LLM_CONFIG"]).write_text(iniText, encoding="utf-8")
    os.kill(service.process.pid, signal.SIGHUP)  # type: ignore[union-attr]


def modelsStatus(service: ServiceProcess, key: str) -> int:
    """One request on a new connection (so the kernel hands it to whichever worker accepts)."""
    return httpx.get(service.baseUrl + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                     timeout=30).status_code


@contextlib.contextmanager
def onlyWorker(pid: int, others: set[int]) -> Iterator[None]:
    """Every new connection goes to ``pid``: the other workers are stopped (SIGSTOP) meanwhile."""
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def statusesPerWorker(service: ServiceProcess, pids: set[int]) -> dict[int, tuple[int, int]]:
    """(old key, rotated key) statuses answered by each worker on its own."""
    answers = {}
    for pid in sorted(pids):
        with onlyWorker(pid, pids - {pid}):
            answers[pid] = (modelsStatus(service, OPENAI_KEY), modelsStatus(service, ROTATED_KEY))
    return answers


class SlowStream(threading.Thread):
    """A /v1 chat stream read line by line, with the time each line arrived."""

    def __init__(self, service: ServiceProcess) -> None:
        super().__init__(daemon=True)
        self.service, self.status, self.lines = service, 0, []  # type: ignore[var-annotated]
        self.error: Exception | None = None

    def run(self) -> None:
        body = {"model": "poweron-text-general", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        try:
            with httpx.Client(timeout=60) as client, client.stream(
                    "POST", self.service.baseUrl + "/v1/chat/completions", json=body,
                    headers={"Authorization": f"Bearer {OTHER_OPENAI_KEY}"}) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line:
                        self.lines.append((time.monotonic(), line))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.e2e
@needsRedis
def test_sighupReloadsEveryWorkerInPlaceWithoutCuttingAStream(workers, stubControl):
    pids = workerPids(workers.process.pid)
    assert statusesPerWorker(workers, pids) == {pid: (200, 401) for pid in pids}
    stubControl.post("/_stub/config", json={"chunks": STREAM_CHUNKS, "chunkDelayMs": CHUNK_DELAY_MS}).raise_for_status()
    stream = SlowStream(workers)
    stream.start()
    waitFor(lambda: len(stream.lines) >= 2, "the stream's first chunks")
    signalledAt = time.monotonic()
    sighup(workers, TEST_INI.replace(OPENAI_KEY, ROTATED_KEY))
    waitFor(lambda: workers.logText().count("config reloaded") == 2, "both workers reloading in place")
    reloadedAt = time.monotonic()
    stream.join(timeout=WAIT_SECONDS)
    assert stream.error is None and stream.status == 200, (stream.error, stream.status)
    assert stream.lines[-1][1] == "data: [DONE]" and not any("error" in line for _, line in stream.lines)
    assert stream.lines[0][0] < signalledAt and stream.lines[-1][0] > reloadedAt, "the stream was not in flight"
    assert workerPids(workers.process.pid) == pids, "the workers were replaced"
    assert statusesPerWorker(workers, pids) == {pid: (401, 200) for pid in pids}
    assert "restarting processes" not in workers.logText()


@pytest.mark.e2e
@needsRedis
def test_aBadFileOnSighupIsRefusedByEachWorker(workers):
    pids = workerPids(workers.process.pid)
    sighup(workers, TEST_INI.replace(OPENAI_KEY, ROTATED_KEY).replace("discovery_ttl = 0.5", "discovery_ttl = soon"))
    waitFor(lambda: workers.logText().count("config reload refused") == 2, "both workers refusing the file")
    refusals = [line for line in workers.logText().splitlines() if "config reload refused" in line]
    assert all("discovery_ttl" in line for line in refusals), refusals
    assert workerPids(workers.process.pid) == pids
    assert statusesPerWorker(workers, pids) == {pid: (200, 401) for pid in pids}


class FakeWorker:
    def __init__(self, pid: int | None, started: bool) -> None:
        self.pid, self.started = pid, started

    def is_ready(self, timeout: float) -> bool:
        return self.started


def test_onlyStartedWorkersGetTheSighup(monkeypatch, caplog):
    from core import workerSupervisor

    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(workerSupervisor.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    supervisor = object.__new__(workerSupervisor.supervisorClass())  # no sockets, no signal handlers
    supervisor.processes = [FakeWorker(11, True), FakeWorker(12, False), FakeWorker(None, False)]
    with caplog.at_level("INFO", logger="poweron"):
        supervisor.handle_hup()
    assert killed == [(11, signal.SIGHUP)]
    assert "SIGHUP passed on to workers 11" in caplog.text and "SIGHUP for workers 12 held back" in caplog.text
    assert supervisor.pendingHangups == {12}


def test_aWorkerStillStartingGetsTheSighupOnceItHasStarted(monkeypatch, caplog):
    """Not lost: the supervisor remembers the SIGHUP for a worker that was starting and passes it on from its loop
    once that worker has started (once only); a worker replaced meanwhile is forgotten (its successor reads
    config.ini as it starts)."""
    from core import workerSupervisor

    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(workerSupervisor.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    supervisor = object.__new__(workerSupervisor.supervisorClass())  # no sockets, no signal handlers
    starting, replaced = FakeWorker(12, False), FakeWorker(13, False)
    supervisor.processes = [FakeWorker(11, True), starting, replaced]
    supervisor.signal_queue = []
    with caplog.at_level("INFO", logger="poweron"):
        supervisor.handle_hup()
        supervisor.handle_signals()  # the supervisor's loop, while 12 and 13 are still starting
        assert killed == [(11, signal.SIGHUP)]
        starting.started = True
        supervisor.processes[2] = FakeWorker(14, False)  # 13 died while starting and was replaced
        supervisor.handle_signals()
        supervisor.handle_signals()
    assert killed == [(11, signal.SIGHUP), (12, signal.SIGHUP)]
    assert "passed on to worker 12" in caplog.text


def test_aUvicornWithoutTheHangupHandlerKeepsItsOwnSupervisor(monkeypatch, caplog):
    from uvicorn.supervisors import multiprocess

    from core import workerSupervisor

    monkeypatch.delattr(multiprocess.Multiprocess, "handle_hup")
    ran: list[str] = []
    monkeypatch.setattr(workerSupervisor.uvicorn, "run", lambda target, **options: ran.append(target))
    with caplog.at_level("WARNING", logger="poweron"):
        workerSupervisor.runWorkers("app:workerApp", factory=True, workers=2)
    assert ran == ["app:workerApp"]
    assert "SIGHUP restarts the workers" in caplog.text
