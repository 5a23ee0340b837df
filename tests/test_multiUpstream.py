"""Several Ollama daemons behind one service (stub daemons on loopback, the real service as a process): routing
prefers the daemon with the model loaded, a model pulled on one daemon goes only there, a daemon killed under
load loses no request that had not started streaming and comes back by itself, drain lets running streams finish
and sends no new ones (a request queued there goes to another daemon), SIGHUP swaps upstreams and rotates a key
without a failed request, a bad file on SIGHUP keeps the running configuration."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import API_KEY, API_KEY_NAME, OTHER_OPENAI_KEY, OTHER_OPENAI_KEY_NAME, ServiceProcess
from tests.ollamaStub import StubServer

pytestmark = pytest.mark.e2e
OPENAI_KEY_NAME, OPENAI_KEY = "cursor", "test-openai-key-9876543210"
ROTATED_KEY = "test-openai-key-rotated-4242424242"
TEXT_MODEL, REASONING_MODEL = "qwen2.5:7b", "deepseek-r1:70b"
NUM_CTX = 4096
WAIT_SECONDS = 20.0


def iniText(upstreams: dict[str, str], drain: str = "", cursorKey: str = OPENAI_KEY) -> str:
    pairs = ", ".join(f"{name}={url}" for name, url in upstreams.items())
    return f"""
[auth]
api_keys = {API_KEY_NAME}={API_KEY}
openai_keys = {OPENAI_KEY_NAME}={cursorKey}, {OTHER_OPENAI_KEY_NAME}={OTHER_OPENAI_KEY}

[ratelimit]
openai_requests_per_minute = 60000
openai_burst = 1000
max_concurrent_per_key = 100

[ollama]
upstreams = {pairs}
drain = {drain}
num_parallel = 2
num_ctx = {NUM_CTX}
discovery_ttl = 0.5

[whisper]
base_url = http://127.0.0.1:9
enabled = false

[warmup]
models =
"""


def waitFor(condition: Any, what: str, timeout: float = WAIT_SECONDS) -> Any:
    """Poll until condition() is truthy; the deadline only guards against hanging, nothing is timed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def preload(stub: StubServer, model: str) -> None:
    """The daemon has the model in memory (as after a request), with the service's context window."""
    response = httpx.post(stub.url("/api/chat"), json={"model": model, "messages": [], "keep_alive": -1,
                                                        "options": {"num_ctx": NUM_CTX}})
    response.raise_for_status()


def chatsAt(stub: StubServer) -> int:
    """Generation requests the daemon received (warm-up loads with no messages left out)."""
    recorded = httpx.get(stub.url("/_stub/requests?path=/api/chat")).json()["requests"]
    return sum(1 for request in recorded if (request.get("body") or {}).get("messages"))


def isLoaded(stub: StubServer, model: str) -> bool:
    return any(entry["name"].startswith(model) for entry in httpx.get(stub.url("/api/ps")).json()["models"])


def headers(key: str = OTHER_OPENAI_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(base: str, model: str = "poweron-text-general", key: str = OTHER_OPENAI_KEY, stream: bool = False,
         timeout: float = 30.0) -> tuple[int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], "stream": stream}
    with httpx.Client(timeout=timeout) as client:
        if not stream:
            response = client.post(base + "/v1/chat/completions", json=body, headers=headers(key))
            return response.status_code, response.text
        with client.stream("POST", base + "/v1/chat/completions", json=body, headers=headers(key)) as response:
            return response.status_code, response.read().decode()


def streamEndedWell(text: str) -> bool:
    return '"finish_reason":"stop"' in text and text.rstrip().endswith("data: [DONE]") and '"error"' not in text


def keyedHealth(base: str) -> dict[str, Any]:
    return httpx.get(base + "/health", headers={"X-API-Key": API_KEY}).json()


def upstreamState(base: str, name: str) -> dict[str, Any]:
    return next((entry for entry in keyedHealth(base).get("upstreams", []) if entry["name"] == name), {})


@pytest.fixture
def stubs() -> Iterator[dict[str, StubServer]]:
    servers: dict[str, StubServer] = {}

    def start(name: str, models: list[str], **config: Any) -> StubServer:
        servers[name] = StubServer(models=models, **config).start()
        return servers[name]

    yield start  # type: ignore[misc]
    for server in servers.values():
        server.stop()


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start the real service with an ini naming the given upstreams; stopped at the end of the test."""
    for name in list(os.environ):
        if name.startswith("PRIVATE_LLM_"):
            monkeypatch.delenv(name)
    started: list[ServiceProcess] = []

    def start(upstreams: dict[str, StubServer], **options: Any) -> ServiceProcess:
        ini = tmp_path / "config.ini"
        ini.write_text(iniText({name: stub.baseUrl for name, stub in upstreams.items()}, **options))
        process = ServiceProcess(ini).start()
        process.ini = ini  # type: ignore[attr-defined]
        started.append(process)
        waitFor(lambda: all(upstreamState(process.baseUrl, name).get("reachable") for name in upstreams),
                "every upstream discovered")
        return process

    yield start
    for process in started:
        process.stop()


def reload(service: ServiceProcess, text: str) -> None:
    Path(service.ini).write_text(text)  # type: ignore[attr-defined]
    os.kill(service.process.pid, signal.SIGHUP)  # type: ignore[union-attr]


def test_routingPrefersTheDaemonWithTheModelLoaded(stubs, service):
    cold = stubs("cold", [TEXT_MODEL])
    warm = stubs("warm", [TEXT_MODEL])
    preload(warm, TEXT_MODEL)
    running = service({"cold": cold, "warm": warm})
    waitFor(lambda: upstreamState(running.baseUrl, "warm").get("modelsLoaded"), "the warm daemon's /api/ps")
    for _ in range(6):  # one at a time: a free slot everywhere, so only residency decides
        status, _text = chat(running.baseUrl)
        assert status == 200
    assert (chatsAt(warm), chatsAt(cold)) == (6, 0)
    assert not isLoaded(cold, TEXT_MODEL), "the cold daemon had to load the model"
    log = [orjson.loads(line) for line in running.logText().splitlines() if line.startswith('{"ts"')]
    assert {line["upstream"] for line in log if line["route"] == "/v1/chat/completions"} == {"warm"}


def test_aModelPulledOnOneDaemonOnlyGoesThere(stubs, service):
    old = stubs("l4", [TEXT_MODEL, "nomic-embed-text"])
    new = stubs("rtx", [TEXT_MODEL, REASONING_MODEL])
    running = service({"l4": old, "rtx": new})
    listed = httpx.get(running.baseUrl + "/v1/models", headers=headers()).json()["data"]
    assert {"poweron-text-general", "poweron-text-reasoning", "poweron-embed"} <= {m["id"] for m in listed}
    for _ in range(4):
        assert chat(running.baseUrl, "poweron-text-reasoning")[0] == 200
    embed = httpx.post(running.baseUrl + "/v1/embeddings", headers=headers(),
                       json={"model": "poweron-embed", "input": ["one", "two"]})
    assert embed.status_code == 200
    reasoningAt = {name: sum(1 for r in httpx.get(s.url("/_stub/requests?path=/api/chat")).json()["requests"]
                             if (r.get("body") or {}).get("model", "").startswith("deepseek"))
                   for name, s in (("l4", old), ("rtx", new))}
    assert reasoningAt == {"l4": 0, "rtx": 4}
    assert len(httpx.get(new.url("/_stub/requests?path=/api/embed")).json()["requests"]) == 0


def test_killingADaemonUnderLoadLosesNoRequestThatHadNotStartedStreaming(stubs, service):
    doomed = stubs("gpu1", [TEXT_MODEL], chunks=10, chunkDelayMs=100)
    spare = stubs("gpu2", [TEXT_MODEL], chunks=10, chunkDelayMs=100)
    for stub in (doomed, spare):
        preload(stub, TEXT_MODEL)
    running = service({"gpu1": doomed, "gpu2": spare})
    jobs = [False] * 24 + [True] * 8  # whole answers and streams
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(chat, running.baseUrl, stream=stream) for stream in jobs]
        waitFor(lambda: chatsAt(doomed) >= 8, "requests running at gpu1")  # each runs for about a second
        doomed.stop()
        results = [(stream, *future.result()) for stream, future in zip(jobs, futures)]
    assert [status for _stream, status, _text in results] == [200] * len(jobs), "a request failed before streaming"
    wholeFailures = [text for stream, _status, text in results if not stream and '"finish_reason":"stop"' not in text]
    assert wholeFailures == []
    cutStreams = [text for stream, _status, text in results if stream and not streamEndedWell(text)]
    assert all('"content"' in text for text in cutStreams), "a stream failed before its first token"
    assert chatsAt(spare) > len(jobs) // 2
    assert upstreamState(running.baseUrl, "gpu1")["reachable"] is False
    for _ in range(4):  # the dead daemon is out of rotation: nobody waits for it
        assert chat(running.baseUrl)[0] == 200
    doomed.start()  # same port
    waitFor(lambda: upstreamState(running.baseUrl, "gpu1").get("reachable"), "gpu1 back in rotation")
    before = chatsAt(doomed)
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _i: chat(running.baseUrl)[0], range(8))) == {200}
    assert chatsAt(doomed) > before, "the daemon that came back took no requests"


def test_drainLetsRunningStreamsFinishAndSendsNoNewOnes(stubs, service):
    gpu1 = stubs("gpu1", [TEXT_MODEL], chunks=20, chunkDelayMs=100)
    gpu2 = stubs("gpu2", [TEXT_MODEL], chunks=20, chunkDelayMs=100)
    for stub in (gpu1, gpu2):
        preload(stub, TEXT_MODEL)
    running = service({"gpu1": gpu1, "gpu2": gpu2})
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(chat, running.baseUrl, stream=True) for _ in range(4)]
        waitFor(lambda: chatsAt(gpu1) + chatsAt(gpu2) >= 4, "streams running at both")
        atDrain = chatsAt(gpu1)
        assert atDrain >= 1, "no stream runs at gpu1"
        httpx.post(gpu2.url("/_stub/config"), json={"chunks": 2, "chunkDelayMs": 0}).raise_for_status()
        reload(running, iniText({"gpu1": gpu1.baseUrl, "gpu2": gpu2.baseUrl}, drain="gpu1"))
        waitFor(lambda: upstreamState(running.baseUrl, "gpu1").get("draining"), "gpu1 draining in /health")
        for _ in range(6):
            assert chat(running.baseUrl)[0] == 200
        results = [future.result() for future in streams]
    assert all(status == 200 and streamEndedWell(text) for status, text in results), "a running stream was cut"
    assert chatsAt(gpu1) == atDrain, "a draining upstream got a new request"
    assert upstreamState(running.baseUrl, "gpu1")["inFlight"] == 0


def test_aRequestQueuedAtADaemonThatStartsDrainingGoesToAnother(stubs, service):
    warm = stubs("gpu1", [TEXT_MODEL], chunks=40, chunkDelayMs=100)
    cold = stubs("gpu2", [TEXT_MODEL])
    preload(warm, TEXT_MODEL)
    running = service({"gpu1": warm, "gpu2": cold})
    waitFor(lambda: upstreamState(running.baseUrl, "gpu1").get("modelsLoaded"), "gpu1's /api/ps")

    def queuedAt(name: str) -> int:
        return sum(entry["queued"] for entry in keyedHealth(running.baseUrl)["queues"] if entry["upstream"] == name)

    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(chat, running.baseUrl, stream=True) for _ in range(2)]  # both slots at gpu1
        waitFor(lambda: chatsAt(warm) == 2, "two streams running at gpu1")
        waiting = pool.submit(chat, running.baseUrl)  # gpu1 has the model loaded: it waits there for a slot
        waitFor(lambda: queuedAt("gpu1") == 1, "a request queued at gpu1")
        reload(running, iniText({"gpu1": warm.baseUrl, "gpu2": cold.baseUrl}, drain="gpu1"))
        status, text = waiting.result()
        assert status == 200 and '"finish_reason":"stop"' in text, text
        assert not any(stream.done() for stream in streams), "it waited for a stream at gpu1 to end"
        results = [stream.result() for stream in streams]
    assert all(status == 200 and streamEndedWell(text) for status, text in results), "a running stream was cut"
    assert (chatsAt(warm), chatsAt(cold)) == (2, 1), "the queued request went to the draining daemon"
    log = [orjson.loads(line) for line in running.logText().splitlines() if line.startswith('{"ts"')]
    assert sorted(line["upstream"] for line in log if line["route"] == "/v1/chat/completions") == \
        ["gpu1", "gpu1", "gpu2"]


def test_sighupSwapsUpstreamsAndRotatesAKeyWithoutAFailedRequest(stubs, service):
    old = stubs("old", [TEXT_MODEL], chunks=4, chunkDelayMs=20)
    new = stubs("new", [TEXT_MODEL], chunks=4, chunkDelayMs=20)
    running = service({"old": old})
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(chat(running.baseUrl, stream=len(statuses) % 2 == 0)[0])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    waitFor(lambda: len(statuses) >= 8, "load before the reload")
    reload(running, iniText({"new": new.baseUrl}, cursorKey=ROTATED_KEY))
    waitFor(lambda: [entry["name"] for entry in keyedHealth(running.baseUrl).get("upstreams", [])] == ["new"],
            "the new upstream list")
    atSwitch = chatsAt(old)
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join()
    assert set(statuses) == {200}, f"failed requests around the reload: {[s for s in statuses if s != 200]}"
    assert chatsAt(old) == atSwitch and chatsAt(new) > 0
    assert chat(running.baseUrl, key=OPENAI_KEY)[0] == 401
    assert chat(running.baseUrl, key=ROTATED_KEY)[0] == 200
    assert "config reloaded" in running.logText()


def test_aBadConfigOnSighupKeepsTheOldOne(stubs, service):
    gpu1 = stubs("gpu1", [TEXT_MODEL])
    running = service({"gpu1": gpu1})
    reload(running, iniText({"gpu1": gpu1.baseUrl}).replace("upstreams = ", "upstreams = broken entry, "))
    waitFor(lambda: "config reload refused" in running.logText(), "the refusal in the log")
    refusals = [line for line in running.logText().splitlines() if "config reload refused" in line]
    assert len(refusals) == 1 and "[ollama] upstreams" in refusals[0] and gpu1.baseUrl not in refusals[0]
    assert chat(running.baseUrl, key=OPENAI_KEY)[0] == 200
    assert [entry["name"] for entry in keyedHealth(running.baseUrl)["upstreams"]] == ["gpu1"]
    public = httpx.get(running.baseUrl + "/health")
    assert "upstreams" not in public.json() and gpu1.baseUrl not in public.text
