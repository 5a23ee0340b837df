"""The loop's turn gate (core/turns.py): at most N request steps per loop iteration, first come first served; the
service's requests take turns, so one loop iteration stays short under load."""

from __future__ import annotations

import asyncio

import pytest

from core.turns import TURNS_SCOPE_KEY, TurnGate, takeTurn


class IterationCounter:
    """Counts loop iterations: a callback that re-schedules itself runs once per iteration."""

    def __init__(self) -> None:
        self.count = 0
        self.handle: asyncio.Handle | None = None

    def tick(self) -> None:
        self.count += 1
        self.handle = asyncio.get_running_loop().call_soon(self.tick)

    def __enter__(self) -> IterationCounter:
        self.handle = asyncio.get_running_loop().call_soon(self.tick)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.handle is not None
        self.handle.cancel()


async def test_atMostNStepsGoOnPerIterationInArrivalOrder() -> None:
    gate = TurnGate(stepsPerTurn=3)
    order: list[tuple[int, int]] = []

    async def step(index: int, counter: IterationCounter) -> None:
        await gate.turn()
        order.append((index, counter.count))

    with IterationCounter() as counter:
        await asyncio.gather(*(step(index, counter) for index in range(10)))
    assert [index for index, _ in order] == list(range(10))
    perIteration: dict[int, int] = {}
    for _, iteration in order:
        perIteration[iteration] = perIteration.get(iteration, 0) + 1
    assert max(perIteration.values()) <= 3
    assert len(perIteration) >= 4  # 10 steps, 3 per iteration


async def test_aCancelledWaiterDoesNotHoldUpTheOthers() -> None:
    gate = TurnGate(stepsPerTurn=1)
    first = asyncio.ensure_future(gate.turn())
    second = asyncio.ensure_future(gate.turn())
    third = asyncio.ensure_future(gate.turn())
    await asyncio.sleep(0)
    second.cancel()
    await asyncio.wait_for(asyncio.gather(first, third), 2)
    assert second.cancelled()


async def test_aWaiterReleasedAndCancelledAtOncePassesItsTurnOn() -> None:
    gate = TurnGate(stepsPerTurn=1)
    first = asyncio.ensure_future(gate.turn())
    second = asyncio.ensure_future(gate.turn())
    await asyncio.sleep(0)  # both wait; the release runs in the next iteration
    gate._release()  # first is released ...
    first.cancel()  # ... and cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 2)


def test_anAppServedAgainOnANewLoopStartsAfresh() -> None:
    gate = TurnGate(stepsPerTurn=2)
    first = asyncio.new_event_loop()
    waiting: list[asyncio.Task] = []

    async def strand() -> None:  # a turn whose release is scheduled, then the loop stops before it runs
        waiting.append(asyncio.get_running_loop().create_task(gate.turn()))
        await asyncio.sleep(0)
        asyncio.get_running_loop().stop()

    first.create_task(strand())
    first.run_forever()
    assert gate.releaseScheduled and not waiting[0].done()
    first.close()
    asyncio.run(asyncio.wait_for(gate.turn(), 2))


async def test_withoutAGateATurnIsOneLoopPass() -> None:
    with IterationCounter() as counter:
        before = counter.count
        await takeTurn({})
        assert counter.count > before
    gate = TurnGate()
    await asyncio.wait_for(takeTurn({TURNS_SCOPE_KEY: gate}), 2)


def test_theServiceInstallsTheGateAndRequestsTakeTurns(monkeypatch, makeSettings) -> None:
    """A request is counted while in flight; alone it goes straight on, beside another one it takes turns."""
    from fastapi.testclient import TestClient

    import app as appModule

    taken: list[int] = []
    original = TurnGate.turn

    async def counting(self: TurnGate) -> None:
        taken.append(self.requests)
        await original(self)

    monkeypatch.setattr(TurnGate, "turn", counting)
    service = appModule.createApp(makeSettings())
    gate = service.state.turns
    assert isinstance(gate, TurnGate)
    with TestClient(service) as client:
        assert client.get("/health/liveliness").status_code == 200
        assert taken == [] and gate.requests == 0, "a request alone took a turn, or was not counted out"
        gate.requests += 1  # another request in flight
        assert client.get("/health/liveliness").status_code == 200
    assert taken and set(taken) == {2}, "the request took no turn beside another one"


async def test_aRequestAloneGoesStraightOn() -> None:
    """No loop pass for a turn while one request is in flight and nobody waits; a pass as soon as there are two."""
    gate = TurnGate()
    scope = {TURNS_SCOPE_KEY: gate}
    gate.requests = 1
    assert gate.alone()
    with IterationCounter() as counter:
        before = counter.count
        await takeTurn(scope)
        assert counter.count == before
        gate.requests = 2
        assert not gate.alone()
        await asyncio.wait_for(takeTurn(scope), 2)
        assert counter.count > before
    gate.requests = 0  # nothing counts requests (the gate used on its own): every turn is a turn
    assert not gate.alone()
