"""The Redis cache against real Redis and PostgreSQL: hits, misses, races, cancellation.

Needs Redis: TEST_REDIS_URL (default redis://127.0.0.1:6379/0), each test under a key
prefix of its own, removed afterwards. The fault cases start a throwaway redis-server
(localdeps) to stop, slow and restart; where it is missing they skip with the reason,
and fail when CI is set.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from acme_items import deadlines, localdeps
from acme_items.breaker import Breaker, State
from acme_items.cache import DELETED_RANK, Cache, CacheBypassed, CacheError
from acme_items.db import Database
from acme_items.domain.items import Item
from acme_items.repo.cached_items import CachedItemRepository
from acme_items.repo.items import PostgresItemRepository
from acme_items.retry import Retry, RetryBudget, RetryPolicy
from acme_items.settings import CacheSettings

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


async def _require_redis(url: str) -> None:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        _missing(f"Redis is required at TEST_REDIS_URL={url}: {exc}")
    finally:
        await client.aclose()


@pytest.fixture
async def cache() -> AsyncIterator[Cache]:
    """A cache on the shared Redis under a prefix of its own, whose keys are removed after."""
    await _require_redis(REDIS_URL)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = CacheSettings(key_prefix=prefix, max_connections=4)
    async with Cache.connect(
        REDIS_URL, settings, service="test", breaker=Breaker("redis", failures=3, open_for=0.5)
    ) as made:
        try:
            yield made
        finally:
            keys = [key async for key in made.client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await made.client.delete(*keys)


@pytest.fixture
async def local_redis() -> AsyncIterator[localdeps.LocalRedis]:
    """A throwaway redis-server to stop, pause and restart."""
    try:
        localdeps.find_redis()
    except localdeps.LocalServerError as exc:
        _missing(str(exc))
    async with localdeps.redis() as server:
        yield server


class Gate:
    """An ItemRepository wrapper that counts reads and can hold the next one after it read."""

    def __init__(self, items: PostgresItemRepository) -> None:
        self.items = items
        self.reads = 0
        self.delay = 0.0
        self.loaded = asyncio.Event()  # the held read has its row
        self.release = asyncio.Event()  # let the held read go on
        self.hold_next = False

    async def get(self, item_id: uuid.UUID) -> Item | None:
        """The item, counted; held after reading when `hold_next` is set."""
        self.reads += 1
        hold, self.hold_next = self.hold_next, False
        item = await self.items.get(item_id)
        if self.delay:
            await asyncio.sleep(self.delay)
        if hold:
            self.loaded.set()
            await self.release.wait()
        return item

    def __getattr__(self, name: str) -> Any:
        return getattr(self.items, name)


@pytest.fixture
def gate(db: Database) -> Gate:
    return Gate(PostgresItemRepository(db))


@pytest.fixture
def cached(gate: Gate, cache: Cache) -> CachedItemRepository:
    return CachedItemRepository(gate, cache)


async def test_a_miss_reads_postgres_and_fills_then_hits_answer_from_redis(
    cached: CachedItemRepository, gate: Gate
) -> None:
    item = await cached.create("cached", "d", None)

    first = await cached.get(item.id)
    second = await cached.get(item.id)

    assert first == second == item
    assert gate.reads == 1
    assert cached.lookups.counts() == {"hit": 1, "miss": 1, "error": 0, "bypass": 0}


async def test_a_not_found_is_cached_briefly(
    cached: CachedItemRepository, gate: Gate, cache: Cache
) -> None:
    missing = uuid.uuid4()

    assert await cached.get(missing) is None
    assert await cached.get(missing) is None

    assert gate.reads == 1
    ttl = await cache.client.pttl(cache.key("items", str(missing)))
    assert 0 < ttl <= cache.settings.not_found_ttl * 1000


async def test_entries_expire_after_the_ttl_less_jitter(
    cached: CachedItemRepository, cache: Cache
) -> None:
    item = await cached.create("ttl", "", None)
    await cached.get(item.id)

    ttl = await cache.client.pttl(cache.key("items", str(item.id)))
    settings = cache.settings
    assert settings.ttl * (1 - settings.ttl_jitter) * 1000 - 50 <= ttl <= settings.ttl * 1000


async def test_a_reader_that_loaded_the_row_before_an_update_never_caches_the_old_row(
    cached: CachedItemRepository, gate: Gate
) -> None:
    item = await cached.create("old", "", None)
    gate.hold_next = True
    reader = asyncio.create_task(cached.get(item.id))
    await gate.loaded.wait()  # the reader has the old row, not yet in Redis

    updated = await cached.update(item.id, {"name": "new"}, None)
    gate.release.set()  # now it fills, after the update committed and wrote
    assert await reader == item

    assert updated is not None
    assert updated.version == item.version + 1
    reads = gate.reads
    assert await cached.get(item.id) == updated
    assert gate.reads == reads  # a hit: the entry holds the new row


async def test_a_reader_that_loaded_the_row_before_a_delete_never_caches_it(
    cached: CachedItemRepository, gate: Gate, cache: Cache
) -> None:
    item = await cached.create("doomed", "", None)
    gate.hold_next = True
    reader = asyncio.create_task(cached.get(item.id))
    await gate.loaded.wait()

    assert await cached.delete(item.id, None)
    gate.release.set()
    assert await reader == item

    assert await cached.get(item.id) is None
    raw = await cache.client.get(cache.key("items", str(item.id)))
    assert raw == f"{DELETED_RANK}|".encode()


async def test_an_older_version_never_replaces_a_newer_one(cache: Cache) -> None:
    key = cache.key("items", "race")

    assert await cache.put_if_newer(key, 2, b"two", 10)
    assert not await cache.put_if_newer(key, 1, b"one", 10)
    assert not await cache.put_if_newer(key, 2, b"two again", 10)
    assert await cache.put_if_newer(key, 3, b"three", 10)

    assert await cache.get(key) == b"3|three"


async def test_concurrent_misses_of_one_item_make_one_database_read(
    cached: CachedItemRepository, gate: Gate
) -> None:
    item = await cached.create("popular", "", None)
    gate.delay = 0.05

    results = await asyncio.gather(*(cached.get(item.id) for _ in range(20)))

    assert results == [item] * 20
    assert gate.reads == 1


async def test_a_follower_reads_for_itself_when_the_first_reader_is_cancelled(
    cached: CachedItemRepository, gate: Gate
) -> None:
    item = await cached.create("abandoned", "", None)
    gate.hold_next = True
    leader = asyncio.create_task(cached.get(item.id))
    await gate.loaded.wait()
    follower = asyncio.create_task(cached.get(item.id))
    await asyncio.sleep(0.01)

    leader.cancel()
    assert await follower == item
    assert gate.reads == 2


async def test_unreadable_entries_are_misses(
    cached: CachedItemRepository, cache: Cache, gate: Gate
) -> None:
    item = await cached.create("shape", "", None)
    await cache.client.set(cache.key("items", str(item.id)), b"garbage")

    assert await cached.get(item.id) == item
    assert gate.reads == 1


async def test_the_cache_never_takes_more_than_its_share_of_the_deadline(cache: Cache) -> None:
    with deadlines.scope(0.01):
        assert cache._timeout()[0] <= 0.01 * cache.settings.budget_fraction  # noqa: SLF001
    with deadlines.scope(100):
        assert cache._timeout() == (cache.settings.command_timeout, True)  # noqa: SLF001
    with deadlines.scope(0), pytest.raises(CacheBypassed):
        await cache.get(cache.key("x"))


async def test_cancelled_commands_leave_every_pooled_connection_answering_its_own_reply(
    cache: Cache,
) -> None:
    """PITFALLS #32: cancel GETs at random points, then every connection answers right."""
    a, b = cache.key("a"), cache.key("b")
    await cache.client.set(a, b"A")
    await cache.client.set(b, b"B")
    rng = random.Random(32)
    cancelled = 0
    for _ in range(200):
        task = asyncio.create_task(cache.get(a))
        await asyncio.sleep(rng.random() * 0.002)
        if task.cancel():
            cancelled += 1
        try:
            value = await task
        except asyncio.CancelledError:
            continue
        assert value == b"A"
    assert cancelled > 0
    # As many at once as the pool holds, so every pooled connection is used.
    size = cache.settings.max_connections
    for _ in range(5):
        assert await asyncio.gather(*(cache.get(b) for _ in range(size))) == [b"B"] * size
    assert cache.stats()["in_use"] == 0


def _state(breaker: Breaker) -> State:
    return breaker.state


def _local_cache(server: localdeps.LocalRedis, **overrides: Any) -> Any:
    settings = CacheSettings(**{"command_timeout": 0.1, "connect_timeout": 0.1} | overrides)
    return Cache.connect(
        server.url,
        settings,
        service="test",
        breaker=Breaker("redis", failures=3, open_for=0.3),
        retry=Retry(RetryPolicy(max_attempts=3)),
        budget=RetryBudget(),
    )


async def test_redis_does_not_retry_a_command_after_a_timeout(
    local_redis: localdeps.LocalRedis,
) -> None:
    """PITFALLS #34: a slow script that increments, cut by its bound, runs exactly once."""
    async with _local_cache(local_redis, command_timeout=0.1) as cache:
        slow_incr = cache.client.register_script(
            "redis.call('INCR', KEYS[1]) "
            "local t = redis.call('TIME') local stop = t[1] * 1000000 + t[2] + 300000 "
            "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop "
            "return 1"
        )
        started = time.monotonic()
        with pytest.raises(CacheError):
            await cache._call(  # noqa: SLF001 - the call bound under test
                "EVALSHA", lambda: slow_incr(keys=["n"])
            )
        assert time.monotonic() - started < 0.3
        await asyncio.sleep(0.4)  # the script ends on the server
        assert await cache.client.get("n") == b"1"


async def test_reads_go_to_postgres_while_redis_is_down_and_use_it_again_when_it_returns(
    local_redis: localdeps.LocalRedis, db: Database
) -> None:
    gate = Gate(PostgresItemRepository(db))
    async with _local_cache(local_redis) as cache:
        breaker = cache.breaker
        assert breaker is not None
        cached = CachedItemRepository(gate, cache)
        item = await cached.create("resilient", "", None)
        assert await cached.get(item.id) == item  # miss, filled

        local_redis.kill()
        for _ in range(10):
            assert await cached.get(item.id) == item
        assert breaker.state is State.OPEN
        counts = cached.lookups.counts()
        assert counts["error"] >= breaker.failures
        assert counts["bypass"] > 0

        # An update while Redis is down: its write waits for Redis to come back.
        updated = await cached.update(item.id, {"name": "changed while down"}, None)
        assert updated is not None
        assert cached.pending

        await local_redis.restart()
        deadline = time.monotonic() + 10
        while _state(breaker) is not State.CLOSED and time.monotonic() < deadline:
            assert await cached.get(item.id) == updated
            await asyncio.sleep(0.05)
        assert _state(breaker) is State.CLOSED
        assert not cached.pending
        reads = gate.reads
        assert await cached.get(item.id) == updated
        assert gate.reads == reads  # served by Redis again


async def test_a_slow_redis_costs_reads_at_most_the_command_cap(
    local_redis: localdeps.LocalRedis, db: Database
) -> None:
    gate = Gate(PostgresItemRepository(db))
    async with _local_cache(local_redis, command_timeout=0.1) as cache:
        cached = CachedItemRepository(gate, cache)
        item = await cached.create("slow", "", None)
        await cached.get(item.id)
        local_redis.pause()  # SIGSTOP: connections open, no replies
        try:
            took = []
            for _ in range(6):
                started = time.monotonic()
                assert await cached.get(item.id) == item
                took.append(time.monotonic() - started)
        finally:
            local_redis.resume()
        breaker = cache.breaker
        assert breaker is not None
        assert breaker.state is State.OPEN
        # Each read paid at most the cap (plus the database read); once open, nothing.
        assert max(took) < 0.1 + 1.0
        assert cached.lookups.bypass > 0
