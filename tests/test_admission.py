"""Admission control (upstream/fairQueue.py, upstream/admission.py), driven step by step: no sleeps, no timing
asserts. Slots are taken with ``enqueue`` and given back with ``release``, so the order in which waiters are
admitted is exactly what the tests read."""

from __future__ import annotations

import asyncio
import random

import pytest

from upstream.admission import Admission, AdmissionPolicy, AdmissionRefused, UpstreamClosed
from upstream.fairQueue import FairLimiter, QueueFull, QueueTimeout


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drain(limiter: FairLimiter, holders: list) -> list[str]:
    """Release the longest holder, one at a time, until nothing waits; the key names in the order admitted."""
    order = []
    holders = list(holders)
    while limiter.waiting:
        waitingBefore = list(limiter.waiting)
        holders.pop(0).release()
        for ticket in waitingBefore:
            if ticket.admitted:
                order.append(ticket.keyName)
                holders.append(ticket)
    return order


def enqueueMany(limiter: FairLimiter, keyName: str, count: int) -> list:
    return [limiter.enqueue(keyName) for _ in range(count)]


def test_admitsUpToTheLimitThenQueues():
    limiter = FairLimiter(2, 10, 60)
    first, second, third = (limiter.enqueue("a") for _ in range(3))
    assert first.admitted and second.admitted and not third.admitted
    assert limiter.busy == 2 and third.position() == 1
    first.release()
    assert third.admitted and limiter.busy == 2 and not limiter.waiting


def test_releaseIsIdempotent():
    limiter = FairLimiter(1, 10, 60)
    ticket = limiter.enqueue("a")
    ticket.release()
    ticket.release()
    assert limiter.busy == 0
    assert limiter.enqueue("a").admitted


def test_aFullQueueRefuses():
    limiter = FairLimiter(1, 2, 60)
    limiter.enqueue("a")
    limiter.enqueue("a")
    limiter.enqueue("b")
    with pytest.raises(QueueFull) as refused:
        limiter.enqueue("c")
    assert refused.value.ahead == 2


def test_aLateKeyGoesBeforeAFloodersBacklog():
    limiter = FairLimiter(2, 100, 60)
    holders = enqueueMany(limiter, "B", 2)
    enqueueMany(limiter, "B", 20)
    enqueueMany(limiter, "A", 1)
    order = drain(limiter, holders)
    assert order.index("A") <= 1, order


def test_fifoModeServesInArrivalOrder():
    limiter = FairLimiter(2, 100, 60, fair=False)
    holders = enqueueMany(limiter, "B", 2)
    enqueueMany(limiter, "B", 20)
    enqueueMany(limiter, "A", 1)
    assert drain(limiter, holders)[-1] == "A"


def test_twoBackloggedKeysAlternate():
    limiter = FairLimiter(1, 100, 60)
    holders = enqueueMany(limiter, "B", 1)
    enqueueMany(limiter, "B", 6)
    enqueueMany(limiter, "A", 6)
    order = drain(limiter, holders)
    assert order == ["B", "A"] * 6 or order == ["A", "B"] * 6, order


def test_weightsShareInProportion():
    limiter = FairLimiter(1, 100, 60, weights={"interactive": 3})
    holders = enqueueMany(limiter, "batch", 1)
    enqueueMany(limiter, "batch", 12)
    enqueueMany(limiter, "interactive", 12)
    firstSixteen = drain(limiter, holders)[:16]
    assert firstSixteen.count("interactive") == 12, firstSixteen


def test_anIdleKeySavesNoCredit():
    limiter = FairLimiter(1, 100, 60)
    for _ in range(10):  # A alone, one at a time: its finish tag runs ahead of nothing
        limiter.enqueue("A").release()
    holders = enqueueMany(limiter, "C", 1)
    enqueueMany(limiter, "B", 4)
    enqueueMany(limiter, "A", 4)
    order = drain(limiter, holders)
    assert order[:4].count("A") == 2 and order[:4].count("B") == 2, order


def test_aKeysOwnRequestsKeepTheirOrder():
    rng = random.Random(16)
    limiter = FairLimiter(2, 1000, 60, weights={"k1": 4, "k2": 2})
    sent: dict[str, list] = {}
    admittedOrder: list = []
    live = []
    for _ in range(300):
        if live and rng.random() < 0.45:
            ticket = live.pop(rng.randrange(len(live)))
            waitingBefore = list(limiter.waiting)
            ticket.release()
            admittedOrder.extend(t for t in waitingBefore if t.admitted)
            live.extend(t for t in waitingBefore if t.admitted)
        else:
            key = rng.choice(["k1", "k2", "k3"])
            ticket = limiter.enqueue(key)
            sent.setdefault(key, []).append(ticket)
            if ticket.admitted:
                live.append(ticket)
                admittedOrder.append(ticket)
    for key, tickets in sent.items():
        served = [t for t in admittedOrder if t.keyName == key]
        assert served == tickets[:len(served)], key


def test_positionFollowsTheFairOrder():
    limiter = FairLimiter(1, 100, 60)
    limiter.enqueue("B")
    floods = [limiter.enqueue("B") for _ in range(5)]
    late = limiter.enqueue("A")
    assert late.position() == 1  # its start tag is the virtual time now; the flood's run ahead of it
    assert [t.position() for t in floods] == [2, 3, 4, 5, 6]


async def test_waitReturnsWhenASlotIsHandedOver():
    limiter = FairLimiter(1, 10, 60)
    holder = limiter.enqueue("a")
    waiter = limiter.enqueue("b")
    task = asyncio.create_task(waiter.wait())
    await asyncio.sleep(0)
    assert not task.done()
    holder.release()
    await task
    assert waiter.admitted and limiter.busy == 1


async def test_aCancelledWaiterLeavesTheQueue():
    limiter = FairLimiter(1, 10, 60)
    holder = limiter.enqueue("a")
    waiter = limiter.enqueue("b")
    task = asyncio.create_task(waiter.wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not limiter.waiting
    holder.release()
    assert limiter.busy == 0


async def test_aWaiterCancelledJustAfterItsSlotCameGivesItBack():
    limiter = FairLimiter(1, 10, 60)
    holder = limiter.enqueue("a")
    waiter = limiter.enqueue("b")
    task = asyncio.create_task(waiter.wait())
    await asyncio.sleep(0)
    holder.release()  # the slot is handed to the waiter, whose task has not run yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.busy == 0 and limiter.enqueue("c").admitted


async def test_aWaiterThatWaitsTooLongGetsQueueTimeout():
    limiter = FairLimiter(1, 10, 0)
    limiter.enqueue("a")
    limiter.enqueue("b")
    waiter = limiter.enqueue("c")
    with pytest.raises(QueueTimeout) as timedOut:
        await waiter.wait()
    assert timedOut.value.position == 2 and waiter not in limiter.waiting and len(limiter.waiting) == 1


def test_busySecondsAndQueueSecondsUseTheClock():
    clock = FakeClock()
    limiter = FairLimiter(1, 10, 60, clock=clock)
    holder = limiter.enqueue("a")
    waiter = limiter.enqueue("b")
    clock.now += 3
    assert waiter.queueSeconds == 3
    holder.release()
    clock.now += 2
    waiter.release()
    assert waiter.queueSeconds == 3 and limiter.busySeconds == 5


# ------------------------------------------------------------------------------------------------ admission


def test_slotsPerModelKindAndOverride():
    policy = AdmissionPolicy(numParallel=4, slotsPerModel={"qwen2.5vl:7b": 1})
    admission = Admission(policy)
    assert admission.queueFor("default", "qwen2.5:7b").limiter.limit == 4
    assert admission.queueFor("default", "nomic-embed-text", "embed").limiter.limit == 1  # as Ollama does
    assert admission.queueFor("default", "qwen2.5vl:7b").limiter.limit == 1
    assert admission.queueFor("gpu2", "qwen2.5:7b") is not admission.queueFor("default", "qwen2.5:7b")
    tagged = Admission(AdmissionPolicy(slotsPerModel={"nomic-embed-text": 4}))
    assert tagged.queueFor("default", "nomic-embed-text:latest", "embed").limiter.limit == 4


def test_queueFullIs503WithRetryAfterFromTheMeasuredServiceTime():
    clock = FakeClock()
    admission = Admission(AdmissionPolicy(numParallel=2, maxQueue=4), clock=clock)
    first = admission.enqueue("default", "m", "a")
    clock.now += 10
    first.release()  # measured: 10 s per request
    for _ in range(6):
        admission.enqueue("default", "m", "a")
    with pytest.raises(AdmissionRefused) as refused:
        admission.enqueue("default", "m", "b")
    error = refused.value
    assert error.status == 503 and error.code == "queue_full"
    assert error.headers["Retry-After"] == "25"  # (4 ahead + 1) / 2 slots x 10 s


async def test_queueTimeoutIs503():
    refusals = []
    admission = Admission(AdmissionPolicy(numParallel=1, maxQueueWaitSeconds=0))
    admission.refusalListeners.append(lambda *args: refusals.append(args))
    admission.enqueue("default", "m", "a")
    ticket = admission.enqueue("default", "m", "b")
    with pytest.raises(AdmissionRefused) as refused:
        await admission.wait(ticket)
    assert refused.value.code == "queue_timeout" and int(refused.value.headers["Retry-After"]) >= 1
    assert refusals == [("default", "m", "b", "queue_timeout")]


async def test_slotHoldsAndReleasesAndReportsTheWait():
    admitted = []
    admission = Admission(AdmissionPolicy(numParallel=1))
    admission.admissionListeners.append(lambda *args: admitted.append(args[:3]))
    async with admission.slot("default", "m", "a") as ticket:
        assert ticket.admitted
        assert admission.snapshot()[0] == {"upstream": "default", "model": "m", "kind": "generate",
                                                 "slotsBusy": 1, "slots": 1, "queued": 0, "queuedByKey": {},
                                                 "serviceSeconds": None}
    assert admission.snapshot()[0]["slotsBusy"] == 0 and admitted == [("default", "m", "a")]


def test_serviceTimeIsAMovingAverage():
    clock = FakeClock()
    admission = Admission(AdmissionPolicy(numParallel=1), clock=clock)
    for seconds in (10, 20):
        ticket = admission.enqueue("default", "m", "a")
        clock.now += seconds
        ticket.release()
    assert admission.queueFor("default", "m").serviceSeconds == pytest.approx(12.0)


# ------------------------------------------------------------------------------------------------ upstream closed


async def test_closingAnUpstreamSendsItsWaitersElsewhereAndKeepsItsRunningRequests():
    admission = Admission(AdmissionPolicy(numParallel=1))
    running = admission.enqueue("gpu1", "m", "a")
    waiting = admission.enqueue("gpu1", "m", "b")
    notYetWaiting = admission.enqueue("gpu1", "m", "c")
    elsewhereHolder = admission.enqueue("gpu2", "m", "a")
    elsewhere = admission.enqueue("gpu2", "m", "b")
    task = asyncio.create_task(admission.wait(waiting))
    await asyncio.sleep(0)
    assert admission.evict("gpu1") == 2
    with pytest.raises(UpstreamClosed) as closed:
        await task
    assert closed.value.status == 503 and closed.value.headers["Retry-After"]
    with pytest.raises(UpstreamClosed):
        await admission.wait(notYetWaiting)
    queue = admission.queueFor("gpu1", "m").limiter
    assert running.admitted and not running.released and queue.busy == 1 and not queue.waiting
    running.release()
    assert queue.busy == 0 and not waiting.admitted and not notYetWaiting.admitted
    assert not elsewhere.admitted and admission.queueFor("gpu2", "m").limiter.waiting == [elsewhere]
    elsewhereHolder.release()
    assert elsewhere.admitted


async def test_aWaiterHandedASlotWhereNoRequestsGoAnyMoreGivesItBack():
    admission = Admission(AdmissionPolicy(numParallel=1))
    holder = admission.enqueue("gpu1", "m", "a")
    waiter = admission.enqueue("gpu1", "m", "b")
    task = asyncio.create_task(admission.wait(waiter))
    await asyncio.sleep(0)
    admission.accepting = lambda upstream: upstream != "gpu1"  # drained, nobody evicted the queue (yet)
    holder.release()
    with pytest.raises(UpstreamClosed):
        await task
    assert admission.queueFor("gpu1", "m").limiter.busy == 0 and waiter.released


async def test_aRequestPollingForASharedSlotStopsWhenItsUpstreamCloses():
    class FullEverywhere:  # other instances hold every slot of the model (Redis)
        shared, retrySeconds = True, 0.01

        async def tryAcquire(self, upstream: str, model: str, limit: int) -> None:
            return None

    admission = Admission(AdmissionPolicy(numParallel=1), slots=FullEverywhere())  # type: ignore[arg-type]
    ticket = admission.enqueue("gpu1", "m", "a")
    task = asyncio.create_task(admission.wait(ticket))
    await asyncio.sleep(0.05)
    assert not task.done()
    admission.accepting = lambda upstream: False
    with pytest.raises(UpstreamClosed):
        await asyncio.wait_for(task, 5)
    assert ticket.released and admission.queueFor("gpu1", "m").limiter.busy == 0


# ------------------------------------------------------------------------------------------------ reconfigure


def test_reconfigureAppliesNewSlotsQueueLengthWaitAndWeights():
    admission = Admission(AdmissionPolicy(numParallel=1, maxQueue=4, maxQueueWaitSeconds=60))
    holder = admission.enqueue("default", "m", "a")
    first, second = admission.enqueue("default", "m", "b"), admission.enqueue("default", "m", "c")
    embed = admission.queueFor("default", "e", "embed").limiter
    admission.reconfigure(AdmissionPolicy(numParallel=2, maxQueue=1, maxQueueWaitSeconds=5,
                                          slotsPerModel={"e": 3}, weights={"b": 4}))
    limiter = admission.queueFor("default", "m").limiter
    assert holder.admitted and first.admitted and not second.admitted  # a slot more: the next waiter goes
    assert (limiter.limit, limiter.maxQueue, limiter.maxWaitSeconds, limiter.weights) == (2, 1, 5, {"b": 4})
    assert embed.limit == 3 and admission.policy.numParallel == 2
    with pytest.raises(AdmissionRefused):  # the queue holds one now
        admission.enqueue("default", "m", "d")
    assert admission.queueFor("default", "new").limiter.limit == 2


def test_reconfigureKeepsTheQueuedPlacesAndCancelsNoRunningRequest():
    admission = Admission(AdmissionPolicy(numParallel=2))
    running = [admission.enqueue("default", "m", "a") for _ in range(2)]
    queued = [admission.enqueue("default", "m", key) for key in ("a", "b", "a", "b")]
    before = [ticket.position() for ticket in queued]
    admission.reconfigure(AdmissionPolicy(numParallel=1, weights={"b": 2}))
    assert [ticket.position() for ticket in queued] == before
    assert all(ticket.admitted and not ticket.released for ticket in running)
    running[0].release()
    assert not any(ticket.admitted for ticket in queued)  # still one busy: the one slot is taken
    running[1].release()
    assert [ticket.admitted for ticket in queued] == [position == 1 for position in before]  # the first in line


# ------------------------------------------------------------------------------------------------ client view


async def test_queuedPositionsTellThePlaceAndGiveItBackWhenClosed():
    from core.requestContext import RequestMeta
    from upstream.ollamaClient import OllamaClient

    admission = Admission(AdmissionPolicy(numParallel=1))
    client = OllamaClient(None, "http://127.0.0.1:9", admission).forRequest(  # type: ignore[arg-type]
        RequestMeta(requestId="r", method="POST", path="/v1/chat/completions", keyName="cursor"))
    holder = admission.enqueue("default", "m", "batch")
    ticket = client.enqueue("/api/chat", {"model": "m"}, None)
    positions = client.queuedPositions(ticket, 0.001)
    assert await anext(positions) == 1
    await positions.aclose()
    assert not admission.queueFor("default", "m").limiter.waiting and ticket.released
    holder.release()
    assert admission.queueFor("default", "m").limiter.busy == 0
    assert client.enqueue("/api/tags", {"model": "m"}, None) is None  # only model calls take a slot
    assert OllamaClient(None, "http://x", admission).enqueue("/api/chat", {"model": "m"}, None) is None  # type: ignore[arg-type]
