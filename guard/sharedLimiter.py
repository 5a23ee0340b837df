"""Per-key limits shared by every instance through Redis (``[state] redis_url``): the same token bucket and in-flight
cap as guard/rateLimit.py, kept in Redis by one atomic script per request (state/redisStore.py), so a key gets its
limits once however many instances serve it.

While Redis is unreachable the per-instance ``RateLimiter`` answers instead: with the configured limits
(``fail_open``) or with this instance's share of them (``fail_closed``: limits divided by the instances alive at
the last successful heartbeat, or by ``[state] instances`` when no count was ever seen; state/redisStore.py).
Either way the client gets a 200 or a 429, never a 5xx; the store probes Redis back and the shared limits resume.
"""

from __future__ import annotations

import time

from config import Settings
from guard.rateLimit import Admission, Clock, KeyLimits, RateLimiter, concurrencyError, keyLimitsFor, rateError
from guard.rateLimit import rawHeaders
from state.redisStore import RedisStore, StateUnavailable

FAIL_CLOSED = "fail_closed"


class SharedRateLimiter:
    """Admits or refuses requests per (key class, key name) against limits kept in Redis."""

    def __init__(self, settings: Settings, store: RedisStore, clock: Clock = time.monotonic) -> None:
        self.store = store
        self.limits: dict[tuple[str, str], KeyLimits] = {}
        for keyClass, keys in (("api", settings.apiKeys), ("openai", settings.openAiKeys)):
            for name in keys:
                self.limits[(keyClass, name)] = keyLimitsFor(settings, keyClass, name)
        self.settings = settings
        self.fallback = RateLimiter(settings, clock, instances=self.shareDivisor())

    def shareDivisor(self) -> int:
        """What the per-instance fallback divides the limits by (1 for fail_open)."""
        if self.settings.state.failure_mode != FAIL_CLOSED:
            return 1
        return self.store.shareDivisor(self.settings.state.instances)

    def reconfigure(self, settings: Settings) -> None:
        """New keys and limits (a reload); the counts in Redis stay."""
        self.limits = {(keyClass, name): keyLimitsFor(settings, keyClass, name)
                       for keyClass, keys in (("api", settings.apiKeys), ("openai", settings.openAiKeys))
                       for name in keys}
        self.settings = settings
        self.fallback.reconfigure(settings)

    async def acquire(self, keyClass: str, name: str) -> Admission:
        """Count one request against the key; raises a 429 ServiceError when a limit is reached."""
        if self.store.reachable:
            try:
                return await self._acquireShared(keyClass, name)
            except StateUnavailable:
                pass
        if (share := self.shareDivisor()) != self.fallback.instances:
            self.fallback.resize(self.settings, share)
        return await self.fallback.acquire(keyClass, name)

    async def _acquireShared(self, keyClass: str, name: str) -> Admission:
        limits = self.limits[(keyClass, name)]
        result = await self.store.admit(f"{keyClass}:{name}", limits.burst, limits.requestsPerMinute / 60.0,
                                        limits.concurrent)
        remaining = int(result.tokens + 1e-9)
        if result.outcome == "concurrency":
            raise concurrencyError(name, limits, remaining)
        if result.outcome == "rate":
            raise rateError(name, limits, result.waitSeconds)

        def release() -> None:
            self.store.release(result.leaseKey, result.leaseId)

        return Admission(release, rawHeaders(limits, remaining))
