"""Shared state in Redis through redis-py's asyncio client and Lua scripts, each one atomic round trip:

- ``admit``: a key's token bucket and its in-flight leases together (prune expired leases, check the in-flight cap,
  refill and take one token, add a lease);
- ``lease``: one slot of a bounded pool (e.g. per upstream and model) as a lease;
- ``renew``: push the expiry of the leases this instance still holds;
- ``count``: the live leases of a pool;
- ``heartbeat``: announce this instance and count the live ones (below).

Time is Redis' own clock (``TIME``), so instances with drifting clocks agree. A lease is a member of a sorted set
scored by its expiry; this instance renews what it holds every ``lease_seconds / 3``, so a crashed instance's
leases fall out within ``lease_seconds``. Redis' reachability is tracked here: the first failure logs one line and
switches callers to their fallback, a probe every second brings it back (one line again).

Instances announce themselves (``heartbeat``): every ``heartbeat_seconds`` each one puts its id into one sorted set
scored by an expiry ``HEARTBEAT_TTL_FACTOR`` intervals ahead, drops the expired ids and counts the rest, so a hung or
crashed instance is gone after that TTL (a closing one takes its id out at once). A reload (SIGHUP) with another
``heartbeat_seconds`` calls ``reconfigure``: one beat at once with the new TTL, the next ones at the new period.
``liveInstances`` is the count of the last successful heartbeat; it stays while Redis is unreachable, and
``shareDivisor`` gives it to the ``fail_closed`` fallbacks (``[state] instances`` until a count was ever seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from dataclasses import dataclass

import redis.asyncio as redisAsyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger("poweron.state")

KEY_PREFIX = "poweron:"
PROBE_SECONDS = 1.0
HEARTBEAT_TTL_FACTOR = 3
"""An instance's announcement outlives its last heartbeat by this many intervals (one late beat is no departure)."""
INSTANCES_KEY = KEY_PREFIX + "instances"
RELEASE_TIMEOUT_SECONDS = 2.0

ADMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local capacity, rate = tonumber(ARGV[1]), tonumber(ARGV[2]) / 1000
local concurrent, leaseMs = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(saved[1]) or capacity, tonumber(saved[2]) or now
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
  ts = now
end
if redis.call('ZCARD', KEYS[2]) >= concurrent then
  return {'concurrency', tostring(tokens), '0'}
end
if tokens < 1 - 1e-9 then
  return {'rate', tostring(tokens), tostring((1 - tokens) / rate / 1000)}
end
tokens = math.max(0, tokens - 1)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate) + 60000)
redis.call('ZADD', KEYS[2], now + leaseMs, ARGV[5])
redis.call('PEXPIRE', KEYS[2], leaseMs * 2)
return {'ok', tostring(tokens), '0'}
"""

LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, leaseMs = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + leaseMs, ARGV[3])
redis.call('PEXPIRE', KEYS[1], leaseMs * 2)
return 1
"""

RENEW_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leaseMs = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + leaseMs, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], leaseMs * 2)
return 1
"""

COUNT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttlMs = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttlMs, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttlMs * 2)
return redis.call('ZCARD', KEYS[1])
"""


class StateUnavailable(Exception):
    """Redis did not answer (in time); the caller uses its per-instance fallback."""


@dataclass(frozen=True, slots=True)
class AdmitResult:
    """What the admit script decided: ``ok``, ``rate`` (wait ``waitSeconds``) or ``concurrency``."""

    outcome: str
    tokens: float
    waitSeconds: float
    leaseKey: str
    leaseId: str


class RedisStore:
    """One Redis connection pool, the scripts, the leases this instance holds, and whether Redis is reachable."""

    def __init__(self, url: str, leaseSeconds: float, timeoutSeconds: float, heartbeatSeconds: float = 5.0) -> None:
        self.client = redisAsyncio.Redis.from_url(url, socket_timeout=timeoutSeconds,
                                                  socket_connect_timeout=timeoutSeconds, decode_responses=True,
                                                  retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.leaseMs = int(leaseSeconds * 1000)
        self.timeoutSeconds = timeoutSeconds
        self.instanceId = uuid.uuid4().hex[:12]
        self.reachable = False
        self.held: dict[str, set[str]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.counter = itertools.count(1)
        self.admitScript = self.client.register_script(ADMIT_SCRIPT)
        self.leaseScript = self.client.register_script(LEASE_SCRIPT)
        self.renewScript = self.client.register_script(RENEW_SCRIPT)
        self.countScript = self.client.register_script(COUNT_SCRIPT)
        self.heartbeatScript = self.client.register_script(HEARTBEAT_SCRIPT)
        self.heartbeatSeconds = heartbeatSeconds
        self.rescheduled = asyncio.Event()
        """Set by ``reconfigure``: the heartbeat loop beats now and sleeps the new period from then on."""
        self.liveInstances: int | None = None
        self.maintainer: asyncio.Task | None = None
        self.heartbeater: asyncio.Task | None = None
        self.announced = False
        self.closing = False

    # --- life cycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check Redis once (logging where things stand), announce this instance, and start renewing leases /
        probing and the heartbeat."""
        if await self.probe():
            with contextlib.suppress(StateUnavailable):
                await self.heartbeat()
        self.maintainer = asyncio.create_task(self._maintain(), name="shared-state")
        self.heartbeater = asyncio.create_task(self._beat(), name="shared-state-heartbeat")

    async def close(self) -> None:
        """Give back what this instance holds (releases under way first), then close; silent about Redis now."""
        self.closing = True
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=RELEASE_TIMEOUT_SECONDS)
        for task in (self.maintainer, self.heartbeater):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.reachable:
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                    await self.client.zrem(INSTANCES_KEY, self.instanceId)  # the others count it out at once
                    for key, ids in list(self.held.items()):
                        if ids:
                            await self.client.zrem(key, *ids)
        for task in list(self.tasks):
            task.cancel()
        await self.client.aclose()

    async def _maintain(self) -> None:
        renewEvery = max(0.2, self.leaseMs / 3000)
        while True:
            await asyncio.sleep(renewEvery if self.reachable else PROBE_SECONDS)
            if self.reachable:
                await self._renewAll()
            else:
                await self.probe()

    def reconfigure(self, heartbeatSeconds: float) -> None:
        """A reload: a changed heartbeat period applies at once (a beat now announces with the new TTL, so a longer
        period never lets the last, shorter announcement run out; the next beats follow the new period)."""
        if heartbeatSeconds != self.heartbeatSeconds:
            self.heartbeatSeconds = heartbeatSeconds
            self.rescheduled.set()

    async def _beat(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeatSeconds):
                    await self.rescheduled.wait()
            self.rescheduled.clear()
            if self.reachable:
                with contextlib.suppress(StateUnavailable):
                    await self.heartbeat()

    async def heartbeat(self) -> int:
        """Announce this instance for ``HEARTBEAT_TTL_FACTOR`` intervals and count the live ones (itself included);
        one log line when the count changes."""
        ttlMs = int(self.heartbeatSeconds * HEARTBEAT_TTL_FACTOR * 1000)
        count = int(await self._call(self.heartbeatScript, [INSTANCES_KEY], [ttlMs, self.instanceId]))
        if count != self.liveInstances:
            logger.info("shared state: %d instance(s) alive", count)
        self.liveInstances = count
        return count

    def shareDivisor(self, configured: int) -> int:
        """What ``fail_closed`` divides a limit by: the instances alive at the last successful heartbeat, or
        ``configured`` (``[state] instances``) when no count was ever seen (Redis down since the start)."""
        return self.liveInstances or configured

    async def probe(self) -> bool:
        try:
            async with asyncio.timeout(self.timeoutSeconds * 4):
                await self.client.ping()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.markDown(exc)
            return False
        self.markUp()
        return True

    def markDown(self, exc: BaseException) -> None:
        """One log line when Redis stops answering (no URL: it may carry a password)."""
        if self.closing:
            return
        if self.reachable or not self.announced:
            logger.warning("shared state: Redis unreachable (%s); per-instance limits until it answers again",
                           type(exc).__name__)
        self.reachable, self.announced = False, True

    def markUp(self) -> None:
        if not self.reachable:
            logger.warning("shared state: Redis reachable; limits are shared across instances")
        self.reachable, self.announced = True, True

    async def _call(self, script, keys: list[str], args: list) -> object:
        try:
            async with asyncio.timeout(self.timeoutSeconds * 2):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.markDown(exc)
            raise StateUnavailable(type(exc).__name__) from None

    # --- leases -------------------------------------------------------------------------------------------------

    def newLeaseId(self) -> str:
        return f"{self.instanceId}:{next(self.counter)}"

    async def admit(self, bucketName: str, capacity: int, ratePerSecond: float, concurrent: int) -> AdmitResult:
        """One request against a token bucket and an in-flight cap, atomically; the lease is held when ``ok``."""
        bucketKey, leaseKey, leaseId = KEY_PREFIX + "bucket:" + bucketName, KEY_PREFIX + "inflight:" + bucketName, \
            self.newLeaseId()
        outcome, tokens, wait = await self._call(self.admitScript, [bucketKey, leaseKey],
                                                 [capacity, ratePerSecond, concurrent, self.leaseMs, leaseId])
        if outcome == "ok":
            self.held.setdefault(leaseKey, set()).add(leaseId)
        return AdmitResult(outcome, float(tokens), float(wait), leaseKey, leaseId)

    async def acquireLease(self, poolName: str, limit: int) -> tuple[str, str] | None:
        """One of ``limit`` slots of a pool, or None when all are held; returns (lease key, lease id)."""
        leaseKey, leaseId = KEY_PREFIX + "slots:" + poolName, self.newLeaseId()
        if not await self._call(self.leaseScript, [leaseKey], [limit, self.leaseMs, leaseId]):
            return None
        self.held.setdefault(leaseKey, set()).add(leaseId)
        return leaseKey, leaseId

    async def leasesInUse(self, poolName: str) -> int:
        """Live leases of a pool across all instances."""
        return int(await self._call(self.countScript, [KEY_PREFIX + "slots:" + poolName], []))

    def release(self, leaseKey: str, leaseId: str) -> None:
        """Give a lease back (in the background; while Redis is down it simply expires)."""
        ids = self.held.get(leaseKey)
        if ids is not None:
            ids.discard(leaseId)
            if not ids:
                del self.held[leaseKey]
        if self.reachable:
            task = asyncio.get_running_loop().create_task(self._remove(leaseKey, leaseId))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _remove(self, leaseKey: str, leaseId: str) -> None:
        try:
            async with asyncio.timeout(self.timeoutSeconds * 2):
                await self.client.zrem(leaseKey, leaseId)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.markDown(exc)

    async def _renewAll(self) -> None:
        for leaseKey, ids in list(self.held.items()):
            if not ids:
                continue
            try:
                await self._call(self.renewScript, [leaseKey], [self.leaseMs, *ids])
            except StateUnavailable:
                return
