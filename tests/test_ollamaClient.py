"""The Ollama client: error mapping in one place, NDJSON stream checks, no forwarded Host header (respx)."""

from __future__ import annotations

import httpx
import pytest
import respx

from core.errors import ServiceError
from upstream.ollamaClient import TRUNCATED_STREAM_MESSAGE, OllamaClient, createHttpClient

OLLAMA = "http://127.0.0.1:11434"


@pytest.fixture
async def client():
    http = createHttpClient(1.0, 5.0, 10)
    yield OllamaClient(http, OLLAMA)
    await http.aclose()


async def collect(client: OllamaClient, body: bytes) -> list[dict]:
    respx.post(f"{OLLAMA}/api/chat").respond(200, content=body, headers={"Content-Type": "application/x-ndjson"})
    stream = await client.openStream("/api/chat", {"model": "m", "messages": []}, "poweron-text-general")
    try:
        return [chunk async for chunk in stream.chunks()]
    finally:
        await stream.aclose()


@pytest.mark.parametrize(("exception", "status", "text"), [
    (httpx.ConnectError("refused"), 503, "Ollama is not reachable"),
    (httpx.ReadTimeout("slow"), 504, "did not answer in time"),
    (httpx.RemoteProtocolError("eof"), 502, "closed the connection"),
])
@respx.mock
async def test_transport_failures_map_to_clear_statuses(client: OllamaClient, exception: Exception, status: int,
                                                        text: str) -> None:
    respx.post(f"{OLLAMA}/api/chat").mock(side_effect=exception)
    with pytest.raises(ServiceError) as info:
        await client.chat({"model": "m", "messages": []}, "poweron-text-general")
    assert info.value.status == status and text in info.value.message


@pytest.mark.parametrize(("status", "body", "expected", "text"), [
    (404, b'{"error":"model \'qwen2.5:7b\' not found"}', 404, "`poweron-text-general` is not available"),
    (503, b'{"error":"server busy, please try again.  maximum pending requests exceeded"}', 503, "busy"),
    (400, b'{"error":"\\"qwen2.5:7b\\" does not support thinking"}', 400, "`poweron-text-general` cannot think"),
    (500, b'{"error":"llama runner process has terminated"}', 502, "the log tells why"),
    (403, b"", 502, "Host check"),
])
@respx.mock
async def test_status_errors_map_in_one_place(client: OllamaClient, status: int, body: bytes, expected: int,
                                              text: str) -> None:
    respx.post(f"{OLLAMA}/api/chat").respond(status, content=body)
    with pytest.raises(ServiceError) as info:
        await client.chat({"model": "m", "messages": []}, "poweron-text-general")
    assert info.value.status == expected and text in info.value.message


@respx.mock
async def test_busy_carries_retry_after(client: OllamaClient) -> None:
    respx.post(f"{OLLAMA}/api/chat").respond(503, json={"error": "server busy, please try again."})
    with pytest.raises(ServiceError) as info:
        await client.chat({"model": "m", "messages": []}, "x")
    assert int(info.value.headers["Retry-After"]) > 0


@respx.mock
async def test_stream_yields_chunks_until_done(client: OllamaClient) -> None:
    chunks = await collect(client, b'{"message":{"content":"a"},"done":false}\n\n'
                                   b'{"message":{"content":""},"done":true,"eval_count":1}\n')
    assert [c["done"] for c in chunks] == [False, True] and chunks[1]["eval_count"] == 1


@respx.mock
async def test_stream_error_line_raises(client: OllamaClient) -> None:
    with pytest.raises(ServiceError) as info:
        await collect(client, b'{"message":{"content":"a"},"done":false}\n{"error":"unexpected EOF"}\n')
    assert info.value.status == 502 and info.value.message == "Ollama failed while generating"


@respx.mock
async def test_stream_without_done_line_is_truncated(client: OllamaClient) -> None:
    with pytest.raises(ServiceError) as info:
        await collect(client, b'{"message":{"content":"a"},"done":false}\n')
    assert info.value.message == TRUNCATED_STREAM_MESSAGE


@respx.mock
async def test_stream_error_status_is_raised_before_streaming(client: OllamaClient) -> None:
    respx.post(f"{OLLAMA}/api/chat").respond(404, json={"error": "model 'x' not found"})
    with pytest.raises(ServiceError) as info:
        await client.openStream("/api/chat", {"model": "x"}, "poweron-text-general")
    assert info.value.status == 404 and info.value.code == "model_not_found"


@respx.mock
async def test_host_header_is_the_upstream_not_the_caller(client: OllamaClient) -> None:
    route = respx.post(f"{OLLAMA}/api/chat").respond(json={"message": {"content": "hi"}, "done": True})
    await client.chat({"model": "m", "messages": []}, "x")
    assert route.calls.last.request.headers["host"] == "127.0.0.1:11434"


def test_split_lines_keeps_the_incomplete_rest() -> None:
    from upstream.ollamaClient import splitLines
    assert splitLines(b'{"a":1}\n\n{"b"') == ([b'{"a":1}'], b'{"b"')
    assert splitLines(b'{"a"') == ([], b'{"a"')


@respx.mock
async def test_stream_lines_split_across_reads_and_a_last_line_without_newline(client: OllamaClient) -> None:
    async def pieces():
        for piece in (b'{"message":{"content":"a"},', b'"done":false}\n{"message":', b'{"content":""},"done":true}'):
            yield piece

    respx.post(f"{OLLAMA}/api/chat").respond(200, content=pieces())
    stream = await client.openStream("/api/chat", {"model": "m"}, "poweron-text-general")
    chunks = [chunk async for chunk in stream.chunks()]
    await stream.aclose()
    assert [c["done"] for c in chunks] == [False, True] and chunks[0]["message"]["content"] == "a"
