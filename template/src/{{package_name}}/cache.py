"""Redis: one pooled redis.asyncio client, every call bounded by the deadline and its own cap.

`Cache.connect` builds the client from REDIS_URL (`redis://` or `rediss://`, password,
database number) on a `BlockingConnectionPool` of CACHE__MAX_CONNECTIONS. Each call
(`get`, `put_if_newer`, `ping`) gets at most CACHE__COMMAND_TIMEOUT and at most
CACHE__BUDGET_FRACTION of what is left of the request's deadline, pool wait included:
the cache never eats the budget of the database call behind it (with the process's
alarm clock, the bound holds to within one of its ticks, 1/64 s). redis-py's own
retries are off; the one retry layer is retry.py's, on connection errors only and
for idempotent commands only (every command this module sends is: GET, PING and a
compare-and-set script that writes the same value when run twice). A circuit breaker
for dependency "redis" stops paying connect timeouts while Redis is down: callers
get `CacheBypassed` at once and go to PostgreSQL.

A command cancelled mid-flight (a deadline, a client that went away) leaves no
half-read reply behind: redis-py disconnects a connection on any BaseException
during send or read (CVE-2023-28858/9), and tests/integration/test_cache.py keeps a
cancellation fuzz as the regression guard.

Failures leave this module as `CacheError` (never a ServiceError: a cache failure is
not the caller's, the caller reads the database instead).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import deadlines
from .alarms import Alarms
from .breaker import Breaker, Outcome, State, outcome_of
from .retry import Retry, RetryBudget
from .settings import CacheSettings, redact

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bumped when the layout of keys or values changes: a new build then reads none of
# the entries an older one wrote (they expire by their TTL).
SCHEMA_VERSION = 1
# The rank of a deletion: above every version, so no fill replaces it.
DELETED_RANK = 2**62
# The rank of a NOT_FOUND: below every version, so any real row replaces it.
NOT_FOUND_RANK = -1
# Writes `ARGV[1] .. "|" .. ARGV[2]` with a TTL of ARGV[3] ms unless the key holds a
# value whose rank (the number before "|") is at least ARGV[1]. Idempotent.
_PUT_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, '|', 1, true)
  local rank = sep and tonumber(string.sub(current, 1, sep - 1))
  if rank and rank >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
"""


class Lookups:
    """Counts of one cache's lookups by result, for `cache_requests_total`."""

    __slots__ = ("bypass", "error", "hit", "miss")

    def __init__(self) -> None:
        self.hit = 0  # answered from Redis (a cached NOT_FOUND too)
        self.miss = 0  # no entry: read from PostgreSQL, then filled
        self.error = 0  # Redis failed: read from PostgreSQL
        self.bypass = 0  # Redis not asked (circuit open, no time left, a pending write)

    def counts(self) -> dict[str, int]:
        """Each result and its count."""
        return {"hit": self.hit, "miss": self.miss, "error": self.error, "bypass": self.bypass}


class CacheError(Exception):
    """A cache call failed or was not made; the caller goes on without the cache."""


class CacheBypassed(CacheError):
    """Not sent: Redis's circuit is open, or too little of the deadline is left."""


def _connection_error(error: Exception) -> bool:
    """Retryable: the command never reached Redis or its connection broke.

    Not a pool that had no free connection in time (congestion, not a fault) and
    never a timeout: Redis may have run the command already.
    """
    return isinstance(error, RedisConnectionError) and "No connection available" not in str(error)


def _outcome(error: BaseException | None, *, capped: bool) -> Outcome:
    """What a call's end says about Redis (breaker.outcome_of, for redis-py's errors)."""
    if error is None:
        return Outcome.SUCCESS
    if isinstance(error, TimeoutError | RedisTimeoutError):
        # The cap ran out: Redis is slow. The deadline's share ran out: we are late.
        return Outcome.FAILURE if capped else Outcome.IGNORED
    if isinstance(error, RedisConnectionError):
        if "No connection available" in str(error):
            return Outcome.IGNORED  # our pool is busy; Redis is fine
        return Outcome.FAILURE
    if isinstance(error, RedisError):
        return Outcome.SUCCESS  # Redis answered, with an error
    return outcome_of(error)


class Cache:
    """A Redis client for one service. Build it with `Cache.connect`."""

    def __init__(  # noqa: PLR0913 - the parts, each its own keyword
        self,
        client: aioredis.Redis,
        pool: aioredis.BlockingConnectionPool,
        settings: CacheSettings,
        *,
        prefix: str,
        breaker: Breaker | None = None,
        retry: Retry | None = None,
        budget: RetryBudget | None = None,
        tracer: Tracer | None = None,
        alarms: Alarms | None = None,
    ) -> None:
        if (retry is None) != (budget is None):
            raise ValueError("retry and budget go together")
        self.client = client
        self.pool = pool
        self.settings = settings
        self.prefix = prefix
        self.breaker = breaker
        self.retry = retry
        self.budget = budget
        self._tracer = tracer
        self._alarms = alarms
        # The event loop's latest lag in seconds (looplag.LoopLag.latest), when known.
        self.lag: Callable[[], float] | None = None
        self._put_if_newer = client.register_script(_PUT_IF_NEWER)
        # The lookup counts of each cache kept in Redis, by name (metrics).
        self.named_lookups: dict[str, Lookups] = {}

    @classmethod
    @asynccontextmanager
    async def connect(  # noqa: PLR0913 - the parts, each its own keyword
        cls,
        url: str,
        settings: CacheSettings,
        *,
        service: str,
        breaker: Breaker | None = None,
        retry: Retry | None = None,
        budget: RetryBudget | None = None,
        tracer: Tracer | None = None,
        alarms: Alarms | None = None,
    ) -> AsyncIterator[Cache]:
        """The client of `url`; connections open on first use. Closed, pool too, on exit."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.max_connections,
            # No timers of redis-py's own around the wait for a connection and each
            # reply: `_call` bounds every call (the alarm clock, else an asyncio
            # timeout) and `ping` has its own; a redis-py timer per reply cost a tenth
            # of a cache hit's CPU (docs/cache.md, "The client").
            timeout=None,
            socket_timeout=None,
            socket_connect_timeout=settings.connect_timeout,
            socket_keepalive=True,
            health_check_interval=settings.health_check_interval,
            # redis-py's retries off: retry.py is the one retry layer (docs/cache.md).
            retry=RedisRetry(NoBackoff(), 0),
            client_name=service,
        )
        client = aioredis.Redis(connection_pool=pool)
        prefix = f"{settings.key_prefix or service}:c{SCHEMA_VERSION}"
        cache = cls(
            client,
            pool,
            settings,
            prefix=prefix,
            breaker=breaker,
            retry=retry,
            budget=budget,
            tracer=tracer,
            alarms=alarms,
        )
        log.info("cache configured", extra={"redis": redact(url), "prefix": prefix})
        try:
            yield cache
        finally:
            await cache.close()

    def lookups(self, name: str) -> Lookups:
        """The lookup counts of the cache named `name` (one per kind of entry)."""
        found = self.named_lookups.get(name)
        if found is None:
            found = self.named_lookups[name] = Lookups()
        return found

    def key(self, *parts: str) -> str:
        """The key of `parts` under this service's prefix and schema version."""
        return ":".join((self.prefix, *parts))

    async def get(self, key: str) -> bytes | None:
        """The value at `key` (None: no entry); raises CacheError."""
        result = await self._call("GET", lambda: self.client.get(key))
        return result.encode() if isinstance(result, str) else result

    async def put_if_newer(self, key: str, rank: int, value: bytes, ttl: float) -> bool:
        """Store `rank|value` for `ttl` seconds unless `key` holds a rank >= `rank`.

        Returns whether it was stored; raises CacheError.
        """
        milliseconds = max(1, int(ttl * 1000))

        async def put() -> bool:
            stored = await self._put_if_newer(keys=[key], args=[rank, value, milliseconds])
            return bool(stored)

        return await self._call("EVALSHA", put)

    async def ping(self, *, timeout: float) -> None:
        """Check Redis answers within `timeout` (readiness detail); raises CacheError.

        A pool whose every connection is in use is busy, not down, and passes.
        """
        stats = self.stats()
        if stats["in_use"] >= stats["max"]:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def stats(self) -> dict[str, int]:
        """Pool occupancy: open connections, idle ones, in use, and the bound."""
        idle = len(getattr(self.pool, "_available_connections", ()))
        in_use = len(getattr(self.pool, "_in_use_connections", ()))
        return {
            "size": idle + in_use,
            "idle": idle,
            "in_use": in_use,
            "max": self.pool.max_connections,
        }

    async def close(self) -> None:
        """Close the client and its pool (a client does not close a pool it was given)."""
        await self.client.aclose()
        await self.pool.aclose()
        log.info("cache closed")

    def _timeout(self) -> tuple[float, bool]:
        """The bound of one call, and whether it is the cap (not the deadline's share).

        The cap grows by the event loop's latest lag: a reply that arrived on time but
        waits its turn in a busy loop is not Redis being slow.
        """
        cap = self.settings.command_timeout
        if self.lag is not None:
            cap += self.lag()
        left = deadlines.remaining()
        if left is None:
            return cap, True
        share = left * self.settings.budget_fraction
        if share <= 0:
            raise CacheBypassed("no time left for the cache")
        return (cap, True) if cap <= share else (share, False)

    async def _call(
        self, operation: str, command: Callable[[], Awaitable[T]], *, idempotent: bool = True
    ) -> T:
        """Run `command` under the breaker, the retry policy, the bound and a span."""
        timeout, capped = self._timeout()
        breaker = self.breaker
        if breaker is not None and not breaker.allow(time.monotonic()):
            raise CacheBypassed("redis unavailable (circuit open)")
        span = self._span(operation)
        error: BaseException | None = None
        alarms = self._alarms
        task = asyncio.current_task() if alarms is not None else None
        alarm = None
        try:
            if alarms is None or task is None:
                async with asyncio.timeout(timeout):
                    return await self._run(command, idempotent=idempotent)
            # The process's alarm clock: no loop timer of its own per call (alarms.py).
            alarm = alarms.arm(alarms.loop.time() + timeout, task)
            return await self._run(command, idempotent=idempotent)
        except BaseException as exc:
            if alarm is not None and alarm.expired and isinstance(exc, asyncio.CancelledError):
                assert task is not None  # noqa: S101 - armed only with a task
                task.uncancel()
                exc = TimeoutError(f"no reply within {timeout:.3f} s")
            error = exc
            if isinstance(exc, Exception) and not isinstance(exc, CacheError):
                raise CacheError(f"{operation}: {type(exc).__name__}: {exc}".rstrip(": ")) from exc
            raise
        finally:
            if alarm is not None:
                alarm.disarm()
            if breaker is not None:
                breaker.record(_outcome(error, capped=capped), time.monotonic())
            if span is not None:
                if error is not None:
                    span.set_status(StatusCode.ERROR, type(error).__name__)
                span.end()

    async def _run(self, command: Callable[[], Awaitable[T]], *, idempotent: bool) -> T:
        retry, budget = self.retry, self.budget
        if retry is None or budget is None or not idempotent:
            return await command()
        # The first attempt inline (Retry.begin, then succeeded or resume): no retry
        # coroutines on the path of a command that succeeds.
        retry.begin(budget)
        started = retry.clock()
        try:
            result = await command()
        except Exception as error:  # noqa: BLE001 - resume re-raises what it does not retry
            return await retry.resume(error, command, retryable=_connection_error, budget=budget)
        retry.succeeded(started)
        return result

    def _span(self, operation: str) -> Span | None:
        """A CLIENT span for a call, only when the request's own span is recorded."""
        tracer = self._tracer
        if tracer is None or not trace.get_current_span().is_recording():
            return None
        return tracer.start_span(
            f"redis {operation}",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "redis", "db.operation": operation},
        )


def on_breaker_change(name: str, old: State, new: State) -> None:
    """One log line when the cache degrades to PostgreSQL, one when it is used again."""
    if new is State.OPEN and old is State.CLOSED:
        log.warning(
            "cache degraded: redis unavailable, reads go to PostgreSQL",
            extra={"dependency": name},
        )
    elif new is State.CLOSED:
        log.info("cache restored: redis answers again", extra={"dependency": name})
