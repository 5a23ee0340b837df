"""Slots per (upstream, model): at most ``limit`` requests in flight to one model on one upstream, counted in this
process (``LocalSlots``) or across every instance through Redis leases (``SharedSlots``).

This is the hook for admission control (upstream/): it asks ``await pool.tryAcquire(upstream, model, limit)``
before sending a request to Ollama and calls ``lease.release()`` when the answer (or stream) is done. ``None`` means
every slot is busy: the caller queues the request and tries again when one of its own requests finishes, and, when
``pool.shared`` (other instances free slots it does not see), at least every ``pool.retrySeconds``. A lease of a
crashed instance expires after ``[state] lease_seconds``; while Redis is unreachable the pool counts per instance
(fail_closed: ``limit // instances``, at least 1, with the instances alive at the last successful heartbeat, or
``[state] instances`` when no count was ever seen).
"""

from __future__ import annotations

from typing import Protocol

from state.redisStore import RedisStore, StateUnavailable

SHARED_RETRY_SECONDS = 0.05


class SlotLease(Protocol):
    def release(self) -> None: ...


class SlotPool(Protocol):
    shared: bool
    retrySeconds: float

    async def tryAcquire(self, upstream: str, model: str, limit: int) -> SlotLease | None: ...

    async def inUse(self, upstream: str, model: str) -> int: ...


class _LocalLease:
    __slots__ = ("pool", "name", "released")

    def __init__(self, pool: LocalSlots, name: str) -> None:
        self.pool, self.name, self.released = pool, name, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.counts[self.name] -= 1


class LocalSlots:
    """Slots counted in this process only (one instance, or the fallback while Redis is unreachable)."""

    shared = False
    retrySeconds = 0.0

    def __init__(self, divisor: int = 1) -> None:
        self.counts: dict[str, int] = {}
        self.divisor = divisor

    async def tryAcquire(self, upstream: str, model: str, limit: int) -> SlotLease | None:
        name = poolName(upstream, model)
        if self.counts.get(name, 0) >= max(1, limit // self.divisor):
            return None
        self.counts[name] = self.counts.get(name, 0) + 1
        return _LocalLease(self, name)

    async def inUse(self, upstream: str, model: str) -> int:
        return self.counts.get(poolName(upstream, model), 0)


class _SharedLease:
    __slots__ = ("store", "leaseKey", "leaseId", "released")

    def __init__(self, store: RedisStore, leaseKey: str, leaseId: str) -> None:
        self.store, self.leaseKey, self.leaseId, self.released = store, leaseKey, leaseId, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.store.release(self.leaseKey, self.leaseId)


class SharedSlots:
    """Slots counted across instances as Redis leases; per-instance ``LocalSlots`` while Redis is unreachable."""

    shared = True
    retrySeconds = SHARED_RETRY_SECONDS

    def __init__(self, store: RedisStore, fallback: LocalSlots, failClosedInstances: int | None = None) -> None:
        self.store = store
        self.fallback = fallback
        self.failClosedInstances = failClosedInstances  # [state] instances with fail_closed, None with fail_open

    async def tryAcquire(self, upstream: str, model: str, limit: int) -> SlotLease | None:
        if self.store.reachable:
            try:
                lease = await self.store.acquireLease(poolName(upstream, model), limit)
                return None if lease is None else _SharedLease(self.store, *lease)
            except StateUnavailable:
                pass
        if self.failClosedInstances is not None:
            self.fallback.divisor = self.store.shareDivisor(self.failClosedInstances)
        return await self.fallback.tryAcquire(upstream, model, limit)

    async def inUse(self, upstream: str, model: str) -> int:
        if self.store.reachable:
            try:
                return await self.store.leasesInUse(poolName(upstream, model))
            except StateUnavailable:
                pass
        return await self.fallback.inUse(upstream, model)


def poolName(upstream: str, model: str) -> str:
    return f"{upstream}:{model}"


def slotPoolFor(store: RedisStore | None, failClosed: bool, instances: int) -> SlotPool:
    """Shared slots when Redis is configured, else slots of this process."""
    if store is None:
        return LocalSlots()
    return SharedSlots(store, LocalSlots(store.shareDivisor(instances) if failClosed else 1),
                       instances if failClosed else None)
