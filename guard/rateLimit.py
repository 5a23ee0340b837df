"""Per-key rate limiting: a token bucket (capacity = burst, refill = requests per minute) and a limit on requests
in flight, both per named key. The clock is injectable so tests can step time exactly.

All bookkeeping runs on the event loop thread, so no locks are needed; every check is O(1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from config import Settings
from core.errors import ServiceError

Clock = Callable[[], float]
EPSILON = 1e-9
"""Slack for float rounding, so a token due at exactly t is available at t."""
CONCURRENCY_RETRY_SECONDS = 1


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """The limits of one key."""

    requestsPerMinute: float
    burst: int
    concurrent: int


class TokenBucket:
    """Holds up to ``capacity`` tokens, refilled continuously at ``ratePerSecond``; one request takes one token."""

    __slots__ = ("capacity", "ratePerSecond", "tokens", "updatedAt")

    def __init__(self, capacity: int, ratePerSecond: float, now: float) -> None:
        self.capacity = capacity
        self.ratePerSecond = ratePerSecond
        self.tokens = float(capacity)
        self.updatedAt = now

    def _refill(self, now: float) -> None:
        elapsed = now - self.updatedAt
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.ratePerSecond)
            self.updatedAt = now

    def take(self, now: float) -> float:
        """Take one token; returns 0.0 on success, else the seconds until the next token is available."""
        self._refill(now)
        if self.tokens >= 1.0 - EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.ratePerSecond

    def remaining(self, now: float) -> int:
        """Whole tokens available at ``now`` (without taking one)."""
        elapsed = max(0.0, now - self.updatedAt)
        return int(min(self.capacity, self.tokens + elapsed * self.ratePerSecond) + EPSILON)


class KeyState:
    """The bucket and the in-flight count of one key."""

    __slots__ = ("name", "limits", "bucket", "inFlight")

    def __init__(self, name: str, limits: KeyLimits, now: float) -> None:
        self.name = name
        self.limits = limits
        self.bucket = TokenBucket(limits.burst, limits.requestsPerMinute / 60.0, now)
        self.inFlight = 0

    def release(self) -> None:
        """One request of this key has finished (its response is complete)."""
        self.inFlight = max(0, self.inFlight - 1)


def retryAfterSeconds(waitSeconds: float) -> int:
    """Whole seconds (rounded up, at least 1) after which the next token is available."""
    return max(1, math.ceil(waitSeconds - EPSILON))


def keyLimitsFor(settings: Settings, keyClass: str, name: str) -> KeyLimits:
    """The configured limits of one key: its [ratelimit] per_key entry, else its class defaults."""
    limits = settings.ratelimit
    if keyClass == "api":
        defaults = (limits.api_requests_per_minute, limits.api_burst, limits.max_concurrent_per_key)
    else:
        defaults = (limits.openai_requests_per_minute, limits.openai_burst, limits.max_concurrent_per_key)
    override = settings.perKeyLimits.get(name, (None, None, None))
    rpm, burst, concurrent = (own if own is not None else default for own, default in zip(override, defaults))
    return KeyLimits(float(rpm), int(burst), int(concurrent))


class RateLimiter:
    """Admits or refuses requests per (key class, key name); lives on app.state.rateLimiter."""

    def __init__(self, settings: Settings, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        now = clock()
        self.states: dict[tuple[str, str], KeyState] = {}
        for keyClass, keys in (("api", settings.apiKeys), ("openai", settings.openAiKeys)):
            for name in keys:
                self.states[(keyClass, name)] = KeyState(name, keyLimitsFor(settings, keyClass, name), now)

    def admit(self, keyClass: str, name: str) -> KeyState:
        """Count one request against the key; raises a 429 ServiceError when a limit is reached.

        The caller must call ``release()`` on the returned state when the response is complete.
        """
        state = self.states[(keyClass, name)]
        now = self.clock()
        if state.inFlight >= state.limits.concurrent:
            raise _concurrencyError(state, now)
        wait = state.bucket.take(now)
        if wait > 0.0:
            raise _rateError(state, wait, now)
        state.inFlight += 1
        return state

    def headers(self, state: KeyState) -> list[tuple[bytes, bytes]]:
        """The X-RateLimit-* headers for an admitted request, as raw ASGI headers."""
        pairs = rateLimitHeaders(state, self.clock())
        return [(name.lower().encode(), value.encode()) for name, value in pairs.items()]


def rateLimitHeaders(state: KeyState, now: float) -> dict[str, str]:
    """X-RateLimit-Limit (bucket capacity) and X-RateLimit-Remaining (whole tokens left)."""
    return {"X-RateLimit-Limit": str(state.limits.burst), "X-RateLimit-Remaining": str(state.bucket.remaining(now))}


def _rateError(state: KeyState, wait: float, now: float) -> ServiceError:
    retryAfter = retryAfterSeconds(wait)
    limits = state.limits
    message = (f"Rate limit reached for key '{state.name}': {limits.requestsPerMinute:g} requests per minute "
               f"with bursts of {limits.burst}. Retry after {retryAfter} s.")
    return ServiceError(429, message, code="rate_limit_exceeded", errorType="rate_limit_error",
                        headers={"Retry-After": str(retryAfter), **rateLimitHeaders(state, now)},
                        extra={"retryAfter": retryAfter, "limit": limits.burst, "remaining": 0})


def _concurrencyError(state: KeyState, now: float) -> ServiceError:
    concurrent = state.limits.concurrent
    message = (f"Too many concurrent requests for key '{state.name}': at most {concurrent} may be in flight "
               f"(open streams included). Retry when one has finished.")
    return ServiceError(429, message, code="concurrency_limit_exceeded", errorType="rate_limit_error",
                        headers={"Retry-After": str(CONCURRENCY_RETRY_SECONDS), **rateLimitHeaders(state, now)},
                        extra={"retryAfter": CONCURRENCY_RETRY_SECONDS, "concurrentLimit": concurrent})
