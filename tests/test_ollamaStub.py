"""The Ollama stub honours the contract in shared/reference/ollama-api.md (the proxy's tests rely on it)."""

from __future__ import annotations

import base64
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
from PIL import Image

from tests.ollamaStub import BUSY_MESSAGE, MIDSTREAM_ERROR, ONE_IMAGE_MESSAGE, REPLY_TEMPLATE, StubServer, normaliseName

METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "getWeather", "description": "Weather for a city",
    "parameters": {"type": "object", "required": ["city", "days"],
                   "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                  "unit": {"type": "string", "enum": ["c", "f"]}}}}}


@pytest.fixture
def client(stubControl):
    """The stub (conftest's, one per module), reset, through a client."""
    return stubControl


def chat(model="qwen2.5:7b", content="Hello there, stub", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def ndjson(response: httpx.Response) -> list[dict]:
    return [orjson.loads(line) for line in response.text.splitlines() if line]


def pngBase64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def waitForEvent(http: httpx.Client, kind: str, timeout: float = 3.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = http.get("/_stub/events", params={"type": kind}).json()["events"]
        if events:
            return events[-1]
        time.sleep(0.02)
    raise AssertionError(f"no {kind!r} event within {timeout} s")


def waitForRequests(http: httpx.Client, path: str, count: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while http.get("/_stub/requests", params={"path": path}).json()["count"] < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests to {path} within {timeout} s"
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------- basics


def test_rootVersionAndHead(client):
    root = client.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert client.get("/api/version").json() == {"version": "0.33.0"}


def test_wrongMethodIs405AndUnknownPathIs404(client):
    assert client.get("/api/chat").status_code == 405
    assert client.post("/api/tags").status_code == 405
    missing = client.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")


def test_tagsEntriesHaveFullShapeAndCapabilities(client):
    models = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
    assert "granite3.2-vision:latest" in models and "nomic-embed-text:latest" in models
    entry = models["qwen2.5:7b"]
    assert set(entry) >= {"name", "model", "modified_at", "size", "digest", "details", "capabilities"}
    assert set(entry["details"]) >= {"format", "family", "families", "parameter_size", "quantization_level"}
    assert len(entry["digest"]) == 64 and entry["size"] > 0
    assert models["nomic-embed-text:latest"]["capabilities"] == ["embedding"]
    assert models["llama4:scout"]["capabilities"] == ["completion", "vision", "tools"]


def test_showReturnsCapabilitiesAndContextLength(client):
    shown = client.post("/api/show", json={"model": "qwen3:8b"}).json()
    assert shown["capabilities"] == ["completion", "tools", "thinking"]
    family = shown["details"]["family"]
    assert shown["model_info"][f"{family}.context_length"] > 0
    assert shown["template"] and shown["parameters"]
    missing = client.post("/api/show", json={"model": "ghost"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'ghost' not found"})


def test_namesWithoutTagAreLatest():
    assert normaliseName("Nomic-Embed-Text") == "nomic-embed-text:latest"
    assert normaliseName("qwen2.5:7b") == "qwen2.5:7b"


# ----------------------------------------------------------------------------------------------- chat


def test_streamingIsDefaultWithNdjsonAndFinalMetrics(client):
    response = client.post("/api/chat", json=chat(content="Please summarise the quarterly report now"))
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(response)
    chunks, final = lines[:-1], lines[-1]
    assert len(chunks) == 8 and not any(chunk["done"] for chunk in chunks)
    text = "".join(chunk["message"]["content"] for chunk in chunks)
    assert text == REPLY_TEMPLATE.format(prompt="Please summarise the quarterly report now"[:40])
    assert final["done"] is True and final["done_reason"] == "stop" and final["message"]["content"] == ""
    assert all(isinstance(final[name], int) and final[name] > 0 for name in METRICS)
    assert final["eval_count"] == 8 and final["prompt_eval_count"] == 6
    assert final["total_duration"] >= final["eval_duration"] + final["prompt_eval_duration"]


def test_streamFalseReturnsOneMergedObject(client):
    client.post("/_stub/config", json={"chunks": 3, "replyText": "alpha beta gamma delta"})
    response = client.post("/api/chat", json=chat(stream=False))
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["message"] == {"role": "assistant", "content": "alpha beta gamma delta"}
    assert body["done"] is True and body["eval_count"] == 3


@pytest.mark.parametrize(("payload", "status", "message"), [
    (b"", 400, "missing request body"),
    (b"{not json", 400, "invalid character 'n' looking for beginning of value"),
    ({"messages": []}, 400, "model is required"),
    (chat(model="ghost:1b"), 404, "model 'ghost:1b' not found"),
    (chat(model="qwen2.5:7b", think=True), 400, '"qwen2.5:7b" does not support thinking'),
    (chat(model="deepseek-r1:70b", tools=[WEATHER_TOOL]), 400, '"deepseek-r1:70b" does not support tools'),
    (chat(model="nomic-embed-text"), 400, '"nomic-embed-text" does not support chat'),
    ({"model": "qwen2.5:7b", "messages": "hi"}, 400,
     "json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message"),
])
def test_chatErrorsHaveOllamaStatusAndMessage(client, payload, status, message):
    if isinstance(payload, dict):
        response = client.post("/api/chat", json=payload)
    else:
        response = client.post("/api/chat", content=payload)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": message}


def test_embedUnknownModelMessageDiffers(client):
    response = client.post("/api/embed", json={"model": "ghost", "input": "x"})
    assert response.status_code == 404
    assert response.json() == {"error": 'model "ghost" not found, try pulling it first'}


def test_dataUrlImageIsRejectedLikeGoBase64(client):
    image = "data:image/png;base64," + pngBase64(4, 4)
    payload = {"model": "qwen2.5vl:7b", "messages": [{"role": "user", "content": "x", "images": [image]}]}
    response = client.post("/api/chat", json=payload)
    assert (response.status_code, response.json()) == (400, {"error": "illegal base64 data at input byte 4"})


def test_oneImagePerMessageForMllama(client):
    images = [pngBase64(8, 8), pngBase64(8, 8)]
    payload = {"model": "llama3.2-vision", "messages": [{"role": "user", "content": "x", "images": images}]}
    response = client.post("/api/chat", json=payload)
    assert (response.status_code, response.json()["error"]) == (400, ONE_IMAGE_MESSAGE)
    payload["model"] = "qwen2.5vl:7b"
    assert client.post("/api/chat", json={**payload, "stream": False}).status_code == 200


def test_midstreamErrorKeeps200AndHasNoDoneLine(client):
    response = client.post("/api/chat", json=chat(content="go [[midstream-error]]"))
    assert response.status_code == 200
    lines = ndjson(response)
    assert [line.get("done") for line in lines[:2]] == [False, False]
    assert lines[2:] == [{"error": MIDSTREAM_ERROR}]
    whole = client.post("/api/chat", json=chat(content="go [[midstream-error]]", stream=False))
    assert (whole.status_code, whole.json()) == (500, {"error": MIDSTREAM_ERROR})


def test_truncateEndsWithoutDoneLine(client):
    lines = ndjson(client.post("/api/chat", json=chat(content="[[truncate]] please")))
    assert len(lines) == 2
    assert all(line["done"] is False and "error" not in line for line in lines)


def test_lengthMarkerAndNumPredictGiveDoneReasonLength(client):
    final = ndjson(client.post("/api/chat", json=chat(content="long [[length]]")))[-1]
    assert final["done_reason"] == "length"
    capped = client.post("/api/chat", json=chat(stream=False, options={"num_predict": 2})).json()
    assert (capped["done_reason"], capped["eval_count"]) == ("length", 2)


def test_emptyMessagesIsWarmupWithLoadEvent(client):
    response = client.post("/api/chat", json={"model": "qwen2.5:7b", "messages": []})
    body = response.json()
    assert body["done"] is True and body["done_reason"] == "load"
    assert waitForEvent(client, "load")["model"] == "qwen2.5:7b"
    unload = client.post("/api/chat", json={"model": "qwen2.5:7b", "messages": [], "keep_alive": 0}).json()
    assert unload["done_reason"] == "unload"


def test_toolCallsHaveObjectArgumentsAndCallIds(client):
    lines = ndjson(client.post("/api/chat", json=chat(content="weather in Bern?", tools=[WEATHER_TOOL])))
    calls = [call for line in lines[:-1] for call in line["message"].get("tool_calls", [])]
    assert len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_") and len(call["id"]) == 13
    assert call["function"]["name"] == "getWeather"
    assert call["function"]["arguments"] == {"city": "stub", "days": 1}
    assert lines[-1]["done_reason"] == "stop"


def test_toolResultIsEchoed(client):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "getWeather",
                                                                                   "arguments": {"city": "Bern"}}}]},
                {"role": "tool", "content": "sunny, 21 C", "tool_name": "getWeather"}]
    body = client.post("/api/chat", json={"model": "qwen2.5:7b", "messages": messages, "tools": [WEATHER_TOOL],
                                          "stream": False}).json()
    assert body["message"]["content"] == "The tool returned: sunny, 21 C"
    assert "tool_calls" not in body["message"]


def test_thinkingPrecedesContentAndCanBeDisabled(client):
    lines = ndjson(client.post("/api/chat", json=chat(model="qwen3:8b")))
    kinds = ["thinking" if line["message"].get("thinking") else "content" for line in lines[:-1]]
    assert kinds[:2] == ["thinking", "thinking"] and kinds[-1] == "content"
    assert kinds == sorted(kinds, key=lambda kind: kind == "content")
    merged = client.post("/api/chat", json=chat(model="deepseek-r1:70b", stream=False)).json()
    assert merged["message"]["thinking"] and merged["message"]["content"]
    plain = client.post("/api/chat", json=chat(model="qwen3:8b", think=False, stream=False)).json()
    assert "thinking" not in plain["message"]


def test_schemaFormatJsonFormatAndBadJson(client):
    schema = {"type": "object", "required": ["name", "age", "ok", "tags", "kind"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"},
                             "tags": {"type": "array", "items": {"type": "string"}},
                             "kind": {"enum": ["a", "b"]}, "extra": {"type": "string"}}}
    body = client.post("/api/chat", json=chat(format=schema, stream=False)).json()
    assert orjson.loads(body["message"]["content"]) == {"name": "stub", "age": 1, "ok": True, "tags": [], "kind": "a"}
    streamed = ndjson(client.post("/api/chat", json=chat(format="json")))
    assert orjson.loads("".join(line["message"]["content"] for line in streamed)) == {"answer": "stub"}
    client.post("/_stub/config", json={"badJsonCount": 1})
    assert client.post("/api/chat", json=chat(format="json", stream=False)).json()["message"]["content"] == "not json {"
    again = client.post("/api/chat", json=chat(format="json", stream=False)).json()["message"]["content"]
    assert orjson.loads(again) == {"answer": "stub"}


def test_generateStreamsResponseField(client):
    lines = ndjson(client.post("/api/generate", json={"model": "qwen2.5:7b", "prompt": "Why is the sky blue?"}))
    assert "".join(line["response"] for line in lines[:-1]).endswith("Why is the sky blue?")
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 8


# ----------------------------------------------------------------------------------------------- embeddings


def test_embedVectorsAreNormalisedAndDeterministic(client):
    first = client.post("/api/embed", json={"model": "nomic-embed-text", "input": ["alpha", "beta"]}).json()
    vectors = first["embeddings"]
    assert len(vectors) == 2 and len(vectors[0]) == 768 and vectors[0] != vectors[1]
    assert all(math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-9) for vector in vectors)
    again = client.post("/api/embed", json={"model": "nomic-embed-text", "input": "alpha"}).json()
    assert again["embeddings"] == [vectors[0]]
    small = client.post("/api/embed", json={"model": "nomic-embed-text", "input": "a", "dimensions": 64}).json()
    assert len(small["embeddings"][0]) == 64
    assert math.isclose(math.fsum(v * v for v in small["embeddings"][0]), 1.0, rel_tol=1e-9)
    chatOnly = client.post("/api/embed", json={"model": "qwen2.5:7b", "input": "a"})
    assert chatOnly.status_code == 400


# ----------------------------------------------------------------------------------------------- control API


def test_pullAndRemoveAreVisibleInTags(client):
    pulled = client.post("/_stub/pull", json={"name": "mistral"}).json()
    assert pulled["model"]["name"] == "mistral:latest"
    names = [m["name"] for m in client.get("/api/tags").json()["models"]]
    assert names[0] == "mistral:latest"  # newest first
    assert client.post("/api/chat", json=chat(model="mistral", stream=False)).status_code == 200
    assert client.post("/_stub/remove", json={"name": "mistral"}).status_code == 200
    assert "mistral:latest" not in [m["name"] for m in client.get("/api/tags").json()["models"]]
    assert client.post("/api/chat", json=chat(model="mistral")).status_code == 404


def test_cloudModelsCarryRemoteHost(client):
    client.post("/_stub/pull", json={"name": "gpt-oss:120b-cloud"})
    client.post("/_stub/pull", json={"name": "qwen3-coder:cloud"})
    models = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
    assert models["gpt-oss:120b-cloud"]["remote_model"] == "gpt-oss:120b"
    assert models["qwen3-coder:cloud"]["remote_host"].startswith("https://")
    assert "remote_host" not in models["qwen2.5:7b"]
    assert client.post("/api/chat", json=chat(model="gpt-oss:120b-cloud")).status_code == 401


def test_configRejectsUnknownKeysAndWrongTypes(client):
    assert client.post("/_stub/config", json={"chunkz": 3}).status_code == 400
    assert client.post("/_stub/config", json={"chunks": "3"}).status_code == 400
    assert client.get("/_stub/config").json()["chunks"] == 8


def test_failNextInjectsStatusForNRequests(client):
    client.post("/_stub/config", json={"failNextStatus": 500, "failNextMessage": "boom", "failNextCount": 2})
    statuses = [client.post("/api/chat", json=chat(stream=False)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [500, 500, 200]
    assert statuses[0].json() == {"error": "boom"}
    assert client.get("/api/tags").status_code == 200  # discovery is not affected


def test_requestsAreRecordedWithHeadersAndImageSizes(client):
    image = pngBase64(37, 21)
    payload = {"model": "qwen2.5vl:7b", "stream": False,
               "messages": [{"role": "user", "content": "what is this?", "images": [image]}]}
    assert client.post("/api/chat", json=payload, headers={"x-request-id": "abc"}).status_code == 200
    recorded = client.get("/_stub/requests", params={"path": "/api/chat"}).json()
    assert recorded["count"] == 1
    entry = recorded["requests"][0]
    assert entry["method"] == "POST" and entry["status"] == 200
    assert entry["headers"]["x-request-id"] == "abc" and entry["headers"]["host"].startswith("127.0.0.1:")
    assert entry["body"]["model"] == "qwen2.5vl:7b"
    info = entry["images"][0]
    assert (info["width"], info["height"], info["format"], info["message"]) == (37, 21, "PNG", 0)
    assert info["bytes"] == len(base64.b64decode(image))


def test_hostHeaderCheckGives403WithEmptyBody(client, stub):
    for host in ("localhost:11434", "ollama.internal", "10.1.2.3:11434", "[::1]:11434"):
        assert client.get("/api/version", headers={"host": host}).status_code == 200, host
    rejected = client.post("/api/chat", json=chat(), headers={"host": "evil.example.com"})
    assert rejected.status_code == 403 and rejected.content == b""
    assert client.get("/_stub/requests").json()["requests"][-1]["headers"]["host"] == "evil.example.com"


def test_busyMarkerAndFullQueueGive503(client):
    marker = client.post("/api/chat", json=chat(content="[[busy]]"))
    assert (marker.status_code, marker.json()) == (503, {"error": BUSY_MESSAGE})
    # sched.go getRunner: only requests waiting for a load queue up to maxQueue; the third cold load is refused
    client.post("/_stub/config", json={"maxQueue": 1, "loadDelayMs": 1500})
    client.delete("/_stub/requests")
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=10) as one, httpx.Client(timeout=10) as two:
        first = pool.submit(one.post, client.base_url.join("/api/chat"), json=chat(stream=False))
        waitForRequests(client, "/api/chat", 1)
        second = pool.submit(two.post, client.base_url.join("/api/chat"), json=chat("qwen3:8b", stream=False))
        waitForRequests(client, "/api/chat", 2)
        time.sleep(0.05)
        third = client.post("/api/chat", json=chat("deepseek-r1:70b", stream=False))
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert (third.status_code, third.json()["error"]) == (503, BUSY_MESSAGE)
    assert waitForEvent(client, "busy")["path"] == "/api/chat"


def test_disconnectDuringStreamIsRecorded(client, stub):
    client.post("/_stub/config", json={"chunkDelayMs": 100, "chunks": 20})
    with httpx.Client(base_url=stub.baseUrl, timeout=10) as other:
        with other.stream("POST", "/api/chat", json=chat()) as response:
            lines = response.iter_lines()
            assert orjson.loads(next(lines))["done"] is False
    started = time.monotonic()
    event = waitForEvent(client, "disconnect")
    assert event["path"] == "/api/chat" and 1 <= event["afterChunks"] < 20
    assert time.monotonic() - started < 1.0  # noticed at once, not after the 2 s the reply would take


def test_restartComesBackOnTheSamePort():
    with StubServer(models=["qwen2.5:7b"]) as server:
        port = server.port
        assert httpx.get(server.baseUrl + "/api/version").status_code == 200
        server.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.baseUrl + "/api/version", timeout=2)
        server.start()
        assert server.port == port
        assert httpx.get(server.baseUrl + "/api/version").json() == {"version": "0.33.0"}
        server.restart()
        assert httpx.post(server.baseUrl + "/api/chat", json=chat(stream=False)).status_code == 200


# ------------------------------------------------------------------------------------------ fault modes


EMBED = {"model": "nomic-embed-text", "input": ["one", "two"]}


def setFault(http: httpx.Client, fault: str | None, **extra) -> dict:
    response = http.post("/_stub/config", json={"fault": fault, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_faultConfigIsValidatedAndClearable(client):
    assert client.post("/_stub/config", json={"fault": "explode"}).status_code == 400
    assert client.post("/_stub/config", json={"faultDelayMs": -1}).status_code == 400
    assert client.post("/_stub/config", json={"faultCount": "2"}).status_code == 400
    config = setFault(client, "busy", faultCount=2)
    assert (config["fault"], config["faultCount"], config["faultDelayMs"]) == ("busy", 2, 2000)
    assert setFault(client, "hang")["faultCount"] == -1  # a new fault without a count lasts until cleared
    assert setFault(client, None)["fault"] is None
    assert client.post("/api/chat", json=chat(stream=False)).status_code == 200


@pytest.mark.parametrize("path, body", [("/api/chat", chat()), ("/api/chat", chat(stream=False)),
                                        ("/api/generate", {"model": "qwen2.5:7b", "prompt": "hi"}),
                                        ("/api/embed", EMBED), ("/api/embeddings", {"model": "nomic-embed-text",
                                                                                   "prompt": "hi"})])
def test_busyFaultAnswers503OnEveryModelPath(client, path, body):
    setFault(client, "busy")
    response = client.post(path, json=body)
    assert (response.status_code, response.json()) == (503, {"error": BUSY_MESSAGE})
    event = waitForEvent(client, "fault")
    assert (event["fault"], event["path"]) == ("busy", path)
    assert client.get("/api/tags").status_code == 200  # only model paths are affected


def test_faultCountAndFaultPathsLimitTheFault(client):
    setFault(client, "busy", faultCount=2, faultPaths=["/api/chat"])
    assert client.post("/api/embed", json=EMBED).status_code == 200
    statuses = [client.post("/api/chat", json=chat(stream=False)).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert client.get("/_stub/config").json()["faultCount"] == 0
    assert client.get("/_stub/events", params={"type": "fault"}).json()["count"] == 2


def test_hangFaultNeverAnswersAndRecordsTheClientLeaving(client, stub):
    setFault(client, "hang")
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stub.url("/api/chat"), json=chat(), timeout=httpx.Timeout(5.0, read=0.5))
    assert time.monotonic() - started >= 0.5
    gone = waitForEvent(client, "faultClientGone")
    assert (gone["fault"], gone["path"]) == ("hang", "/api/chat") and gone["afterMs"] >= 400
    assert client.get("/_stub/requests", params={"path": "/api/chat"}).json()["requests"][-1]["disconnected"]


def test_slowFirstTokenDelaysTheFirstByteThenAnswersNormally(client, stub):
    setFault(client, "slowFirstToken", faultDelayMs=600)
    started = time.monotonic()
    with httpx.stream("POST", stub.url("/api/chat"), json=chat(), timeout=10) as response:
        lineIterator = response.iter_lines()
        first = next(lineIterator)
        firstAt = time.monotonic() - started
        lines = [first, *lineIterator]
    assert firstAt >= 0.6
    objects = [orjson.loads(line) for line in lines if line]
    assert objects[-1]["done"] is True and objects[-1]["done_reason"] == "stop"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stub.url("/api/embed"), json=EMBED, timeout=httpx.Timeout(5.0, read=0.2))
    assert waitForEvent(client, "faultClientGone")["fault"] == "slowFirstToken"


def test_midstreamErrorFault(client):
    setFault(client, "midstreamError")
    streamed = client.post("/api/chat", json=chat())
    objects = ndjson(streamed)
    assert streamed.status_code == 200 and len(objects) == 3
    assert all(obj["done"] is False for obj in objects[:2]) and objects[2] == {"error": MIDSTREAM_ERROR}
    whole = client.post("/api/chat", json=chat(stream=False))
    assert (whole.status_code, whole.json()) == (500, {"error": MIDSTREAM_ERROR})
    embedded = client.post("/api/embed", json=EMBED)
    assert (embedded.status_code, embedded.json()) == (500, {"error": MIDSTREAM_ERROR})


def test_truncateFaultCutsTheConnection(client, stub):
    setFault(client, "truncate")
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", stub.url("/api/chat"), json=chat(), timeout=5) as response:
            assert response.status_code == 200
            received.extend(response.iter_lines())
    assert len(received) == 2 and all(orjson.loads(line)["done"] is False for line in received)
    for path, body in (("/api/chat", chat(stream=False)), ("/api/embed", EMBED)):
        with pytest.raises(httpx.RemoteProtocolError, match="expected"):
            httpx.post(stub.url(path), json=body, timeout=5)
    setFault(client, None)
    assert client.post("/api/chat", json=chat(stream=False)).json()["done"] is True


def test_malformedLineFault(client):
    setFault(client, "malformedLine")
    lines = [line for line in client.post("/api/chat", json=chat()).text.splitlines() if line]
    assert orjson.loads(lines[0])["done"] is False
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(lines[1])
    assert orjson.loads(lines[-1])["done"] is True
    for path, body in (("/api/chat", chat(stream=False)), ("/api/embed", EMBED)):
        response = client.post(path, json=body)
        assert response.status_code == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(response.content)


def test_replyFaultsSkipRequestsThatFailValidation(client):
    setFault(client, "midstreamError", faultCount=1)
    assert client.post("/api/chat", json=chat(model="missing:1b")).status_code == 404
    assert client.post("/api/chat", json=chat(stream=False)).status_code == 500
    assert client.post("/api/chat", json=chat(stream=False)).status_code == 200


def test_faultCanBeSwitchedWhileAStreamRuns(client, stub):
    client.post("/_stub/config", json={"chunkDelayMs": 50, "chunks": 6})
    with httpx.stream("POST", stub.url("/api/chat"), json=chat(), timeout=5) as response:
        lines = response.iter_lines()
        next(lines)
        setFault(client, "busy")
        rest = [orjson.loads(line) for line in lines if line]
    assert rest[-1]["done"] is True  # the running stream is not affected
    assert client.post("/api/chat", json=chat()).status_code == 503


def test_stopCutsInFlightRequestsLikeAKilledDaemon():
    with StubServer(models=["qwen2.5:7b"]) as server:
        httpx.post(server.url("/_stub/config"), json={"fault": "hang"})
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(httpx.post, server.url("/api/chat"), json=chat(), timeout=10) for _ in range(2)]
            waitForRequests(httpx.Client(base_url=server.baseUrl), "/api/chat", 2)
            started = time.monotonic()
            server.restart()
            for future in futures:
                with pytest.raises(httpx.RemoteProtocolError):
                    future.result()
            assert time.monotonic() - started < 3.0
        events = httpx.get(server.url("/_stub/events"), params={"type": "faultClientGone"}).json()["events"]
        assert len(events) == 2
        httpx.post(server.url("/_stub/config"), json={"fault": None})
        assert httpx.post(server.url("/api/chat"), json=chat(stream=False)).status_code == 200
