"""Streams under load: what arrived together goes on together, a burst cannot hold the loop, a client leaving ends
the relay and the upstream request (core/clientDisconnect.RelayResponse, upstream/ollamaClient.OllamaStream)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson

from core.clientDisconnect import RelayResponse
from upstream.ollamaClient import OllamaClient, createHttpClient

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunked(line: dict) -> bytes:
    data = orjson.dumps(line) + b"\n"
    return b"%x\r\n" % len(data) + data + b"\r\n"


def lines(count: int) -> list[bytes]:
    """``count`` content lines and the done line, each as one chunk of the chunked encoding (as Ollama writes)."""
    content = [chunked({"model": "m", "message": {"role": "assistant", "content": f"w{index} "}, "done": False})
               for index in range(count)]
    return [*content, chunked({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                               "done_reason": "stop", "prompt_eval_count": 3, "eval_count": count})]


class BurstUpstream:
    """A raw NDJSON upstream on loopback: writes the given groups of lines, each group in one write, the next group
    only when the test says so (so which lines arrive together is certain, without timing)."""

    def __init__(self, groups: list[list[bytes]]) -> None:
        self.groups = groups
        self.next = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD)
        for index, group in enumerate(self.groups):
            if index:
                await self.next.wait()
                self.next.clear()
            writer.write(b"".join(group) + (b"0\r\n\r\n" if index == len(self.groups) - 1 else b""))
            await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()


async def batchesOf(baseUrl: str, upstream: BurstUpstream) -> list[int]:
    client = OllamaClient(createHttpClient(1.0, 5.0, 2, baseUrl), baseUrl)
    sizes = []
    try:
        stream = await client.openStream("/api/chat", {"model": "m", "messages": []}, "poweron-m")
        try:
            async for batch in stream.batches():
                sizes.append(len(batch))
                upstream.next.set()
        finally:
            await stream.aclose()
    finally:
        await client.http.aclose()
    return sizes


async def test_linesThatArriveTogetherComeAsOneBatch() -> None:
    upstream = BurstUpstream([lines(32)])
    async with upstream as baseUrl:
        assert await batchesOf(baseUrl, upstream) == [33]


async def test_linesThatArriveApartComeApart() -> None:
    allLines = lines(3)
    upstream = BurstUpstream([[line] for line in allLines])
    async with upstream as baseUrl:
        assert await batchesOf(baseUrl, upstream) == [1, 1, 1, 1]


async def test_goodLinesBeforeABrokenOneArriveBeforeTheError() -> None:
    broken = b"7\r\n{oops}\n\r\n"
    upstream = BurstUpstream([[*lines(2)[:2], broken]])
    async with upstream as baseUrl:
        client = OllamaClient(createHttpClient(1.0, 5.0, 2, baseUrl), baseUrl)
        stream = await client.openStream("/api/chat", {"model": "m", "messages": []}, "poweron-m")
        batches = stream.batches()
        assert len(await anext(batches)) == 2
        try:
            await anext(batches)
            raise AssertionError("the broken line did not raise")
        except Exception as exc:  # noqa: BLE001 - checked below
            assert getattr(exc, "status", None) == 502 and "not JSON" in str(exc)
        finally:
            await batches.aclose()
            await stream.aclose()
            await client.http.aclose()


def busyFrames(count: int, cpuSeconds: float, closed: list[bool]) -> AsyncIterator[bytes]:
    """Frames that are all there at once (no await between them), each costing ``cpuSeconds`` of CPU."""
    async def frames() -> AsyncIterator[bytes]:
        try:
            for index in range(count):
                end = time.perf_counter() + cpuSeconds
                while time.perf_counter() < end:
                    pass
                yield b"data: %d\n\n" % index
        finally:
            closed.append(True)
    return frames()


async def test_aBurstGivesOtherTasksTurnsWhileItIsRelayed() -> None:
    sent: list[bytes] = []
    othersTurns: list[int] = []

    async def other() -> None:
        while True:
            othersTurns.append(len(sent))
            await asyncio.sleep(0)

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])

    closed: list[bool] = []
    task = asyncio.ensure_future(other())
    await asyncio.sleep(0)
    othersTurns.clear()
    response = RelayResponse(busyFrames(200, RelayResponse.SLICE_SECONDS / 2, closed), media_type="text/plain")
    await response({"type": "http"}, receive, send)
    task.cancel()
    assert len(sent) == 200 and closed == [True]
    middle = [frames for frames in othersTurns if 0 < frames < 200]
    assert len(middle) >= 20, othersTurns  # a turn at least every ~10 frames; without slicing: none in the middle


async def test_aClientLeavingEndsTheRelayAndClosesItsFrames() -> None:
    closed: list[bool] = []
    leave = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        try:
            for index in range(1000):
                if index == 3:
                    leave.set()
                yield b"data: %d\n\n" % index
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    async def receive() -> dict:
        await leave.wait()
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(RelayResponse(frames())({"type": "http"}, receive, send), 5)
    assert closed == [True]
    assert 3 <= len([m for m in sent if m.get("more_body")]) < 20
    assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
