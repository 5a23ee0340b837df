"""The lean upstream transport against the Ollama stub: keep-alive reuse, streaming, early close, httpx's errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from core.errors import ServiceError
from tests.conftest import freePort
from tests.ollamaStub import REPLY_TEMPLATE, StubServer
from upstream.ollamaClient import OllamaClient, createHttpClient
from upstream.transport import UpstreamTransport, mountPattern

HELLO = {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "Hallo"}]}
SLOW = {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "Langsam [[slow]]"}]}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer(models=["qwen2.5:7b", "nomic-embed-text"]) as server:
        yield server


@pytest.fixture
def stubControl(stub: StubServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stub.baseUrl, timeout=5.0) as control:
        control.post("/_stub/reset").raise_for_status()
        yield control


async def clientFor(baseUrl: str, maxConnections: int = 8, readTimeout: float = 5.0) -> OllamaClient:
    return OllamaClient(createHttpClient(1.0, readTimeout, maxConnections, baseUrl), baseUrl)


@pytest.fixture
async def ollama(stub: StubServer, stubControl) -> AsyncIterator[OllamaClient]:
    client = await clientFor(stub.baseUrl)
    yield client
    await client.http.aclose()


def transportOf(client: OllamaClient) -> UpstreamTransport:
    transport = client.http._transport_for_url(client.url("/api/chat"))
    assert isinstance(transport, UpstreamTransport)
    return transport


def test_mount_pattern_only_for_plain_http() -> None:
    assert mountPattern("http://127.0.0.1:11434/") == "http://127.0.0.1:11434"
    assert mountPattern("http://[::1]:11434") == "http://[::1]:11434"
    assert mountPattern("https://10.0.0.5:11434") is None


async def test_sequential_calls_reuse_one_connection(ollama: OllamaClient) -> None:
    answers = [await ollama.chat(HELLO, "poweron-text-general") for _ in range(20)]
    assert all(answer["message"]["content"] == REPLY_TEMPLATE.format(prompt="Hallo") for answer in answers)
    transport = transportOf(ollama)
    assert transport.open == 1 and len(transport.idle[("127.0.0.1", int(ollama.url("/").port))]) == 1


async def test_stream_chunks_arrive_as_they_are_produced(ollama: OllamaClient) -> None:
    stream = await ollama.openStream("/api/chat", SLOW, "poweron-text-general")
    arrivals = []
    try:
        async for chunk in stream.chunks():
            arrivals.append((time.monotonic(), chunk))
    finally:
        await stream.aclose()
    assert arrivals[-1][1]["done"] is True and len(arrivals) == 9
    assert arrivals[-1][0] - arrivals[0][0] >= 1.0  # 8 chunks 0.2 s apart, not delivered in one piece
    assert transportOf(ollama).open == 1  # read to the end: the connection went back to the pool


async def test_closing_a_stream_early_closes_the_connection(ollama: OllamaClient, stubControl) -> None:
    stream = await ollama.openStream("/api/chat", SLOW, "poweron-text-general")
    async for _ in stream.chunks():
        break
    closedAt = time.monotonic()
    await stream.aclose()
    assert transportOf(ollama).open == 0
    for _ in range(40):
        events = stubControl.get("/_stub/events", params={"type": "disconnect"}).json()["events"]
        if events:
            break
        await asyncio.sleep(0.05)
    assert events and events[0]["at"] - closedAt < 1.0


async def test_cancelled_call_closes_its_connection(ollama: OllamaClient, stubControl) -> None:
    task = asyncio.ensure_future(ollama.chat(SLOW, "poweron-text-general"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transportOf(ollama).open == 0
    assert await disconnectsSeen(stubControl) == 1


async def disconnectsSeen(stubControl: httpx.Client) -> int:
    """How many upstream disconnects the stub recorded (waits up to 2 s for the first)."""
    for _ in range(40):
        count = stubControl.get("/_stub/events", params={"type": "disconnect"}).json()["count"]
        if count:
            return count
        await asyncio.sleep(0.05)
    return 0


async def test_refused_connection_is_503() -> None:
    client = await clientFor(f"http://127.0.0.1:{freePort()}")
    with pytest.raises(ServiceError) as info:
        await client.chat(HELLO, "poweron-text-general")
    assert info.value.status == 503 and "not reachable" in info.value.message
    assert transportOf(client).open == 0
    await client.http.aclose()


async def test_silent_upstream_is_a_read_timeout_504(stub: StubServer, stubControl) -> None:
    client = await clientFor(stub.baseUrl, readTimeout=0.1)
    with pytest.raises(ServiceError) as info:
        await client.chat(SLOW, "poweron-text-general")
    assert info.value.status == 504
    await client.http.aclose()


async def test_a_restarted_upstream_does_not_break_the_next_call(stub: StubServer, stubControl) -> None:
    client = await clientFor(stub.baseUrl)
    await client.chat(HELLO, "poweron-text-general")
    stub.restart()
    answer = await client.chat(HELLO, "poweron-text-general")
    assert answer["done"] is True
    await client.http.aclose()


async def test_pool_limit_queues_and_then_times_out(stub: StubServer, stubControl) -> None:
    client = await clientFor(stub.baseUrl, maxConnections=1)
    answers = await asyncio.gather(*[client.chat(HELLO, "poweron-text-general") for _ in range(5)])
    assert len(answers) == 5 and transportOf(client).open == 1
    stream = await client.openStream("/api/chat", SLOW, "poweron-text-general")  # holds the only connection
    client.http.timeout = httpx.Timeout(connect=1.0, read=5.0, write=5.0, pool=0.2)
    with pytest.raises(ServiceError) as info:
        await client.chat(HELLO, "poweron-text-general")
    assert info.value.status == 503 and info.value.code == "upstream_busy"
    await stream.aclose()
    assert (await client.chat(HELLO, "poweron-text-general"))["done"] is True
    await client.http.aclose()


async def test_large_bodies_flow_through(ollama: OllamaClient) -> None:
    texts = [f"Satz Nummer {index}" for index in range(400)]
    answer = await ollama.embed("nomic-embed-text", texts, "poweron-embed")
    assert len(answer["embeddings"]) == 400 and len(answer["embeddings"][0]) == 768


async def test_upstream_error_statuses_still_map(ollama: OllamaClient) -> None:
    with pytest.raises(ServiceError) as info:
        await ollama.chat({**HELLO, "model": "missing:1b"}, "poweron-text-general")
    assert info.value.status == 404


async def test_streamed_request_bodies_use_the_standard_transport(ollama: OllamaClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "qwen2.5:7b"}'

    response = await ollama.http.post(ollama.url("/api/show"), content=body())
    assert response.status_code == 200 and "capabilities" in response.json()


async def _secondRequestClosedAfter(delay: float) -> tuple[httpx.Response | Exception, int]:
    """A server that answers the first request of each connection and closes it `delay` s after the second one
    arrived; returns what the client got for its second call and how many requests the server saw."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
        await writer.drain()
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(delay)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(transport=UpstreamTransport(4, httpx.AsyncHTTPTransport()), timeout=5) as client:
        await client.get(f"http://127.0.0.1:{port}/api/version")
        try:
            second: httpx.Response | Exception = await client.get(f"http://127.0.0.1:{port}/api/version")
        except httpx.HTTPError as exc:
            second = exc
    server.close()
    return second, len(seen)


async def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    second, requests = await _secondRequestClosedAfter(0.0)
    assert isinstance(second, httpx.Response) and second.status_code == 200
    assert requests == 3  # the first, the one on the stale connection, the retry


async def test_a_connection_cut_while_the_server_works_is_not_replayed() -> None:
    second, requests = await _secondRequestClosedAfter(0.8)
    assert isinstance(second, httpx.RemoteProtocolError)
    assert requests == 2


async def _streamsOverSeparateWrites(streams: int) -> tuple[list[int], int, list[bytes]]:
    """A server that streams NDJSON as Ollama does, one chunk per write and the chunked terminator in a write of its
    own after the done line; returns the content lines per stream, the connections it saw and the request heads."""
    connections: list[int] = []
    heads: list[bytes] = []
    lines = [b'{"message":{"content":"w%d "},"done":false}\n' % index for index in range(3)]
    lines.append(b'{"message":{"content":""},"done":true,"eval_count":3}\n')

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for line in lines:
                    writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = await clientFor(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    counts = []
    for _ in range(streams):
        stream = await client.openStream("/api/chat", HELLO, "poweron-text-general")
        try:
            counts.append(len([chunk async for chunk in stream.chunks()]))
        finally:
            await stream.aclose()
    await client.http.aclose()
    server.close()
    return counts, len(connections), heads


async def test_a_finished_stream_returns_its_connection_even_when_the_end_of_the_body_comes_later() -> None:
    """Ollama writes the chunked body's terminator after the done line: the stream reads it (briefly) so the
    connection is reused instead of closed, and the next stream needs no new connection."""
    counts, connections, _ = await _streamsOverSeparateWrites(3)
    assert counts == [4, 4, 4]
    assert connections == 1


async def test_calls_go_straight_to_the_transport_with_a_plain_request_head() -> None:
    _, _, heads = await _streamsOverSeparateWrites(1)
    head = heads[0].decode("latin-1").lower()
    assert head.startswith("post /api/chat http/1.1\r\n")
    assert "\r\nhost: 127.0.0.1:" in head and "\r\ncontent-type: application/json\r\n" in head
    assert "user-agent" not in head and "accept-encoding" not in head  # not httpx's client layer
