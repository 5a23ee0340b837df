"""The stub's scheduler behaves like Ollama's `server/sched.go` (reference ollama-api.md §12): runner options kept
per loaded model and reloads on a difference, /api/ps context length, OLLAMA_NUM_PARALLEL slots with unbounded
waiting, 503 `server busy` only from the load queue, default num_ctx by version."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.ollamaStub import BUSY_MESSAGE
from tests.stubScheduler import defaultNumCtx, runnerOptions, versionTuple


@pytest.fixture
def client(stubControl):
    """The stub (conftest's, one per module), reset, through a client."""
    return stubControl


def chat(model="qwen2.5:7b", content="Hello there, stub", numCtx=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": False, **extra}
    if numCtx is not None:
        body["options"] = {"num_ctx": numCtx}
    return body


def counters(http: httpx.Client) -> dict:
    return http.get("/_stub/scheduler").json()


def psContext(http: httpx.Client, name: str) -> int:
    return next(entry["context_length"] for entry in http.get("/api/ps").json()["models"] if entry["name"] == name)


def waitFor(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_versionTupleAndDefaultNumCtx():
    assert versionTuple("0.12.4") == (0, 12, 4) and versionTuple("v0.33.0-rc2") == (0, 33, 0)
    assert versionTuple("0.13") == (0, 13, 0)
    assert defaultNumCtx("0.12.10", 0, 96) == 4096  # envconfig before v0.20
    assert defaultNumCtx("0.33.0", 0, 24) == 32768 and defaultNumCtx("0.33.0", 0, 96) == 262144
    assert defaultNumCtx("0.33.0", 8192, 96) == 8192  # OLLAMA_CONTEXT_LENGTH wins
    assert runnerOptions({"num_ctx": 1024}, 128000, True, 4096)["num_ctx"] == 2048  # vision: at least 2048
    assert runnerOptions({"num_ctx": 65536}, 2048, False, 4096)["num_ctx"] == 2048  # capped at the trained length


def test_runnerKeepsItsOptionsAndReloadsOnADifference(client):
    """sched.go needsReload: reflect.DeepEqual(optsExisting, optsNew) over api.Runner (num_ctx among them)."""
    client.post("/_stub/config", json={"loadDelayMs": 200})
    started = time.monotonic()
    assert client.post("/api/chat", json=chat(numCtx=8192)).status_code == 200
    assert time.monotonic() - started >= 0.2  # cold load
    assert psContext(client, "qwen2.5:7b") == 8192
    started = time.monotonic()
    client.post("/api/chat", json=chat(numCtx=8192))
    assert time.monotonic() - started < 0.15  # same options: the loaded runner, no load delay
    assert counters(client)["reloads"] == 0
    started = time.monotonic()
    client.post("/api/chat", json=chat(numCtx=16384))
    assert time.monotonic() - started >= 0.2
    assert psContext(client, "qwen2.5:7b") == 16384
    client.post("/api/chat", json=chat())  # unset num_ctx -> 32768 (v0.20+ default at 24 GiB) -> another reload
    assert psContext(client, "qwen2.5:7b") == 32768
    state = counters(client)
    assert (state["loads"], state["reloads"]) == (3, 2)
    reload = client.get("/_stub/events", params={"type": "reload"}).json()["events"][0]
    assert (reload["old"]["num_ctx"], reload["new"]["num_ctx"]) == (8192, 16384)


def test_warmupLoadsWithItsOwnOptions(client):
    """A load request (messages: []) goes through the scheduler with its options like any other request."""
    client.post("/api/chat", json={"model": "qwen2.5:7b", "messages": []})
    assert psContext(client, "qwen2.5:7b") == 32768
    client.post("/api/chat", json=chat(numCtx=8192))
    assert counters(client)["reloads"] == 1


def test_olderVersionDefaultWindowIs4096(client):
    client.post("/_stub/config", json={"version": "0.12.10"})
    assert client.get("/api/version").json() == {"version": "0.12.10"}
    client.post("/api/chat", json=chat())
    assert psContext(client, "qwen2.5:7b") == 4096


def test_reloadWaitsForRequestsInFlightOnTheOldRunner(client, stub):
    client.post("/_stub/config", json={"chunks": 6, "chunkDelayMs": 100, "loadDelayMs": 0, "numParallel": 2})
    client.post("/api/chat", json=chat(numCtx=8192))
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(httpx.post, stub.url("/api/chat"), json=chat(numCtx=8192), timeout=15)
        waitFor(lambda: counters(client)["runners"]["qwen2.5:7b"]["refs"] == 1)
        started = time.monotonic()
        other = client.post("/api/chat", json=chat(numCtx=4096))
        waited = time.monotonic() - started
        assert slow.result().status_code == 200 and other.status_code == 200
    assert waited >= 0.4  # the 6 x 100 ms stream on the old runner had to finish first
    assert counters(client)["reloads"] == 1


def test_numParallelSlotsAndUnboundedWaitingForALoadedModel(client, stub):
    """A request for a loaded model with matching options is attached at once and waits for a slot without limit
    (no 503 even with OLLAMA_MAX_QUEUE 0)."""
    client.post("/_stub/config", json={"chunks": 4, "chunkDelayMs": 100, "numParallel": 2, "maxQueue": 0})
    client.post("/api/chat", json=chat(numCtx=8192))
    peak = []
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(httpx.post, stub.url("/api/chat"), json=chat(numCtx=8192), timeout=15)
                   for _ in range(6)]
        while not all(future.done() for future in futures):
            runner = counters(client)["runners"]["qwen2.5:7b"]
            peak.append((runner["busy"], runner["waiting"]))
            time.sleep(0.02)
        statuses = [future.result().status_code for future in futures]
    assert statuses == [200] * 6
    assert max(busy for busy, _ in peak) == 2
    assert max(waiting for _, waiting in peak) >= 2
    assert counters(client)["busy"] == 0


def test_embeddingModelsAndSomeArchitecturesGetOneSlot(client):
    """sched.go load: embedding models (no completion capability) and e.g. mllama load with num_parallel 1."""
    client.post("/_stub/config", json={"numParallel": 4})
    client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    client.post("/api/chat", json=chat("llama3.2-vision:latest"))
    client.post("/api/chat", json=chat())
    slots = {name: runner["slots"] for name, runner in counters(client)["runners"].items()}
    assert slots == {"nomic-embed-text:latest": 1, "llama3.2-vision:latest": 1, "qwen2.5:7b": 4}


def test_busyOnlyWhenTheLoadQueueIsFull(client, stub):
    """sched.go getRunner: `pendingReqCh <- req` or ErrMaxQueue; requests waiting for a load count."""
    client.post("/_stub/config", json={"maxQueue": 1, "loadDelayMs": 1500})
    models = ("qwen2.5:7b", "qwen3:8b", "deepseek-r1:70b")
    senders = [httpx.Client(timeout=15) for _ in models]  # made beforehand: a new client takes ~0.5 s under load
    with ThreadPoolExecutor(3) as pool:
        futures = []
        for index, model in enumerate(models):
            futures.append(pool.submit(senders[index].post, stub.url("/api/chat"), json=chat(model)))
            waitFor(lambda wanted=index + 1: client.get("/_stub/requests").json()["count"] == wanted)
            time.sleep(0.05)
        answers = [future.result() for future in futures]
    for sender in senders:
        sender.close()
    assert [answer.status_code for answer in answers] == [200, 200, 503]
    assert answers[2].json() == {"error": BUSY_MESSAGE}


def test_clientLeavingWhileQueuedFreesItsPlace(client, stub):
    client.post("/_stub/config", json={"chunks": 10, "chunkDelayMs": 200, "numParallel": 1, "loadDelayMs": 0})
    client.post("/api/chat", json=chat(numCtx=8192))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, stub.url("/api/chat"), json=chat(numCtx=8192), timeout=15)
        waitFor(lambda: counters(client)["runners"]["qwen2.5:7b"]["busy"] == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(stub.url("/api/chat"), json=chat(numCtx=8192), timeout=0.5)
        assert slow.result().status_code == 200
    waitFor(lambda: client.get("/_stub/events", params={"type": "queuedClientGone"}).json()["count"] == 1)
    runner = counters(client)["runners"]["qwen2.5:7b"]
    assert (runner["refs"], runner["busy"], runner["waiting"]) == (0, 0, 0)


def test_tokensPerSecondPacesEveryReply(client):
    client.post("/_stub/config", json={"tokensPerSecond": 20, "chunks": 8, "loadDelayMs": 0})
    client.post("/api/chat", json=chat(numCtx=8192))
    started = time.monotonic()
    answer = client.post("/api/chat", json=chat(numCtx=8192)).json()
    assert answer["eval_count"] == 8 and time.monotonic() - started >= 8 / 20
