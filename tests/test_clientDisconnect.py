"""clientDisconnect.untilDisconnect: cancels the work when the client goes away, and leaves no cyclic garbage when
it does not (the watcher ends on its own once the response is complete)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from core.clientDisconnect import ClientDisconnected, untilDisconnect


class FakeConnection:
    """The ASGI receive channel of one request whose body was read already: it reports ``http.disconnect`` when
    the client goes away or once the response is complete, as uvicorn, httpx and Starlette's TestClient do."""

    def __init__(self) -> None:
        self.ended = asyncio.Event()

    async def receive(self) -> dict:
        await self.ended.wait()
        return {"type": "http.disconnect"}

    def end(self) -> None:
        self.ended.set()


class FakeRequest:
    def __init__(self, connection: FakeConnection) -> None:
        self.receive = connection.receive


async def answer(value: str, delay: float = 0.0) -> str:
    await asyncio.sleep(delay)
    return value


async def test_returnsTheResultAndTheWatcherEndsWithTheResponse() -> None:
    connection = FakeConnection()
    assert await untilDisconnect(FakeRequest(connection), answer("ok")) == "ok"
    watchers = [t for t in asyncio.all_tasks() if "_watch" in repr(t.get_coro())]
    assert watchers and not any(t.done() for t in watchers)
    connection.end()  # the response is complete: the server reports http.disconnect
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert all(t.done() and not t.cancelled() for t in watchers)
    assert not asyncio.current_task().cancelling()


async def test_clientGoneCancelsTheWork() -> None:
    connection = FakeConnection()
    started = asyncio.get_running_loop().time()
    work = asyncio.ensure_future(answer("late", delay=30))

    async def slowWork() -> str:
        return await work

    asyncio.get_running_loop().call_later(0.05, connection.end)
    with pytest.raises(ClientDisconnected):
        await untilDisconnect(FakeRequest(connection), slowWork())
    await asyncio.sleep(0)
    assert work.cancelled()
    assert asyncio.get_running_loop().time() - started < 5
    assert not asyncio.current_task().cancelling()


async def test_noCyclicGarbagePerRequest() -> None:
    requests = 200
    gc.collect()
    gc.disable()
    try:
        for _ in range(requests):
            connection = FakeConnection()
            await untilDisconnect(FakeRequest(connection), answer("ok"))
            connection.end()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert unreachable < requests, f"{unreachable} cyclic objects left by {requests} requests"
