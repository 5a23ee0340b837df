"""Per-key rate limiting: a token bucket (capacity = burst, refill = requests per minute) and a limit on requests
in flight, both per named key. The clock is injectable so tests can step time exactly.

All bookkeeping runs on the event loop thread, so no locks are needed; every check is O(1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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


def shareOf(limits: KeyLimits, instances: int) -> KeyLimits:
    """One instance's share of a key's limits when ``instances`` split them (each part at least 1)."""
    return KeyLimits(limits.requestsPerMinute / instances, max(1, limits.burst // instances),
                     max(1, limits.concurrent // instances))


@dataclass(slots=True)
class Admission:
    """An admitted request: ``release()`` frees its in-flight slot; ``headers`` go on the response."""

    release: Callable[[], None]
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


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

    def __init__(self, settings: Settings, clock: Clock = time.monotonic, instances: int = 1) -> None:
        self.clock = clock
        self.instances = instances
        now = clock()
        self.states: dict[tuple[str, str], KeyState] = {}
        for keyClass, keys in (("api", settings.apiKeys), ("openai", settings.openAiKeys)):
            for name in keys:
                limits = shareOf(keyLimitsFor(settings, keyClass, name), instances)
                self.states[(keyClass, name)] = KeyState(name, limits, now)

    async def acquire(self, keyClass: str, name: str) -> Admission:
        """``admit`` as the limiter interface the key dependencies use (shared limiters answer it too)."""
        state = self.admit(keyClass, name)
        return Admission(state.release, self.headers(state))

    def reconfigure(self, settings: Settings) -> None:
        """New keys and limits (a reload): a kept key keeps its in-flight count and its tokens (up to the new
        burst); a removed key's running requests release their old state."""
        now = self.clock()
        states: dict[tuple[str, str], KeyState] = {}
        for keyClass, keys in (("api", settings.apiKeys), ("openai", settings.openAiKeys)):
            for name in keys:
                limits = shareOf(keyLimitsFor(settings, keyClass, name), self.instances)
                state = self.states.get((keyClass, name)) or KeyState(name, limits, now)
                if state.limits != limits:
                    state.bucket._refill(now)  # noqa: SLF001 - tokens earned under the old rate count
                    state.limits = limits
                    state.bucket.capacity, state.bucket.ratePerSecond = limits.burst, limits.requestsPerMinute / 60.0
                    state.bucket.tokens = min(state.bucket.tokens, float(limits.burst))
                states[(keyClass, name)] = state
        self.states = states

    def resize(self, settings: Settings, instances: int) -> None:
        """Another share of the limits (``fail_closed`` with another number of live instances): each bucket keeps
        the fraction of its capacity it holds (a full one stays full), in-flight counts stay."""
        now = self.clock()
        fractions: dict[tuple[str, str], float] = {}
        for key, state in self.states.items():
            state.bucket._refill(now)  # noqa: SLF001 - tokens earned under the old share count
            fractions[key] = state.bucket.tokens / state.bucket.capacity
        self.instances = instances
        self.reconfigure(settings)
        for key, fraction in fractions.items():
            if (state := self.states.get(key)) is not None:
                state.bucket.tokens = fraction * state.bucket.capacity

    def admit(self, keyClass: str, name: str) -> KeyState:
        """Count one request against the key; raises a 429 ServiceError when a limit is reached.

        The caller must call ``release()`` on the returned state when the response is complete.
        """
        state = self.states[(keyClass, name)]
        now = self.clock()
        if state.inFlight >= state.limits.concurrent:
            raise concurrencyError(state.name, state.limits, state.bucket.remaining(now))
        wait = state.bucket.take(now)
        if wait > 0.0:
            raise rateError(state.name, state.limits, wait)
        state.inFlight += 1
        return state

    def headers(self, state: KeyState) -> list[tuple[bytes, bytes]]:
        """The X-RateLimit-* headers for an admitted request, as raw ASGI headers."""
        return rawHeaders(state.limits, state.bucket.remaining(self.clock()))


def rawHeaders(limits: KeyLimits, remaining: int) -> list[tuple[bytes, bytes]]:
    pairs = rateLimitHeaders(limits, remaining)
    return [(name.lower().encode(), value.encode()) for name, value in pairs.items()]


def rateLimitHeaders(limits: KeyLimits, remaining: int) -> dict[str, str]:
    """X-RateLimit-Limit (bucket capacity) and X-RateLimit-Remaining (whole tokens left)."""
    return {"X-RateLimit-Limit": str(limits.burst), "X-RateLimit-Remaining": str(remaining)}


def rateError(name: str, limits: KeyLimits, wait: float) -> ServiceError:
    """429 for an empty bucket, with the exact Retry-After."""
    retryAfter = retryAfterSeconds(wait)
    message = (f"Rate limit reached for key '{name}': {limits.requestsPerMinute:g} requests per minute "
               f"with bursts of {limits.burst}. Retry after {retryAfter} s.")
    return ServiceError(429, message, code="rate_limit_exceeded", errorType="rate_limit_error",
                        headers={"Retry-After": str(retryAfter), **rateLimitHeaders(limits, 0)},
                        extra={"retryAfter": retryAfter, "limit": limits.burst, "remaining": 0})


def concurrencyError(name: str, limits: KeyLimits, remaining: int) -> ServiceError:
    """429 for a key at its in-flight cap."""
    concurrent = limits.concurrent
    message = (f"Too many concurrent requests for key '{name}': at most {concurrent} may be in flight "
               f"(open streams included). Retry when one has finished.")
    return ServiceError(429, message, code="concurrency_limit_exceeded", errorType="rate_limit_error",
                        headers={"Retry-After": str(CONCURRENCY_RETRY_SECONDS), **rateLimitHeaders(limits, remaining)},
                        extra={"retryAfter": CONCURRENCY_RETRY_SECONDS, "concurrentLimit": concurrent})
