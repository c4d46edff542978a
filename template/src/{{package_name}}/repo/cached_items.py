"""`domain.items.ItemRepository` with reads of one item served from Redis (cache-aside).

docs/cache.md explains the design. In short: an entry is `rank|payload`, where the
rank is the row's version (a NOT_FOUND ranks below every version, a deletion above
every one), and every write to the cache is a compare-and-set that never replaces a
higher rank. A miss reads PostgreSQL and fills the entry; an update or a delete,
once committed, writes its own result. So a reader that loaded a row before an
update committed and fills after it finds the newer rank and is refused: no later
read returns the old row. Concurrent misses of one item in this process make one
database read (single flight). When Redis fails or its circuit is open, reads go to
PostgreSQL. An update's or a deletion's write that fails (Redis down) is kept and
written again before the next read that reaches Redis; until then reads of that
item bypass the cache in this process.
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

from ..cache import DELETED_RANK, NOT_FOUND_RANK, Cache, CacheBypassed, CacheError
from ..domain.items import Cursor, Item, ItemRepository
from ..errors import DeadlineExceeded
from ..logs import Throttle

log = logging.getLogger(__name__)

_throttle = Throttle(interval=10.0)
# What the lookup found when the entry cannot be read (an old or foreign shape).
_UNREADABLE = object()
# Writes of updates and deletions kept for a later attempt while Redis fails; past
# this many, the oldest is dropped (and logged): its entry expires by its TTL.
MAX_PENDING = 10_000
# Pending writes attempted per read, so that one read never pays for a backlog.
_REPAIRS_PER_READ = 20


def _encode(item: Item) -> bytes:
    return orjson.dumps(
        [
            item.name,
            item.description,
            item.create_time.isoformat(),
            item.update_time.isoformat(),
        ]
    )


def _decode(item_id: UUID, raw: bytes) -> Item | object | None:
    """The entry's item, None for a cached NOT_FOUND or deletion, or _UNREADABLE."""
    try:
        rank_text, separator, payload = raw.partition(b"|")
        rank = int(rank_text)
        if not separator:
            return _UNREADABLE
        if rank in {NOT_FOUND_RANK, DELETED_RANK}:
            return None
        name, description, created, updated = orjson.loads(payload)
        return Item(
            id=item_id,
            name=name,
            description=description,
            create_time=datetime.fromisoformat(created),
            update_time=datetime.fromisoformat(updated),
            version=rank,
        )
    except (ValueError, TypeError):
        return _UNREADABLE


class CachedItemRepository:
    """Items from `items`, with `get` served through `cache` (named "items" in metrics)."""

    name = "items"

    def __init__(self, items: ItemRepository, cache: Cache) -> None:
        self._items = items
        self._cache = cache
        self.lookups = cache.lookups(self.name)
        self._flights: dict[UUID, asyncio.Future[Item | None]] = {}
        self._random = random.random
        # Writes of committed updates and deletions that failed: key -> (rank, payload, ttl).
        self.pending: dict[str, tuple[int, bytes, float]] = {}

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - whatever the wrapped one has
        """Methods of the wrapped repository this class does not cache: yours included.

        A method you add to the repository (and to `ItemRepository`) reaches PostgreSQL
        through this, uncached. One that changes an item must not: its entry would be
        served until the TTL ends (docs/cache.md, "Methods you add").
        """
        return getattr(self._items, name)

    async def create(self, name: str, description: str, request_id: UUID | None) -> Item:
        """Insert (not cached: the first read fills the entry)."""
        return await self._items.create(name, description, request_id)

    async def list_after(self, cursor: Cursor | None, limit: int) -> list[Item]:
        """Pages are not cached: they come from PostgreSQL."""
        return await self._items.list_after(cursor, limit)

    async def update(
        self, item_id: UUID, changes: dict[str, str], expected_version: int | None
    ) -> Item | None:
        """Update in PostgreSQL; once committed, the new row replaces any older entry."""
        item = await self._items.update(item_id, changes, expected_version)
        if item is not None:
            await self._store(
                self._key(item_id), item.version, _encode(item), self._ttl(), keep=True
            )
        return item

    async def delete(self, item_id: UUID, expected_version: int | None) -> bool:
        """Delete in PostgreSQL; once committed, a deletion mark replaces any entry."""
        deleted = await self._items.delete(item_id, expected_version)
        if deleted:
            await self._store(self._key(item_id), DELETED_RANK, b"", self._ttl(), keep=True)
        return deleted

    async def get(self, item_id: UUID) -> Item | None:
        """The item from Redis, else from PostgreSQL (then cached), or None."""
        key = self._key(item_id)
        lookups = self.lookups
        if self.pending and not await self._repair(key):
            lookups.bypass += 1  # the entry may be older than a committed change
            return await self._items.get(item_id)
        try:
            raw = await self._cache.get(key)
        except CacheBypassed:
            lookups.bypass += 1
            return await self._items.get(item_id)
        except CacheError as exc:
            lookups.error += 1
            self._report("cache read failed", exc)
            return await self._items.get(item_id)
        if raw is not None:
            found = _decode(item_id, raw)
            if found is not _UNREADABLE:
                lookups.hit += 1
                return found  # type: ignore[return-value]
        lookups.miss += 1
        return await self._load(item_id, key)

    async def _load(self, item_id: UUID, key: str) -> Item | None:
        """Read PostgreSQL once for all concurrent misses of `item_id`, then fill."""
        flight = self._flights.get(item_id)
        if flight is not None:
            try:
                return await asyncio.shield(flight)
            except (asyncio.CancelledError, DeadlineExceeded):
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or not flight.done():
                    raise  # this request's own cancellation or deadline
                # The first reader's request ended (cancelled, or its shorter deadline
                # ran out): read for ourselves.
                return await self._items.get(item_id)
        flight = asyncio.get_running_loop().create_future()
        self._flights[item_id] = flight
        try:
            item = await self._items.get(item_id)
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except BaseException as exc:
            flight.set_exception(exc)
            flight.exception()  # marked retrieved: the followers, if any, raise it
            raise
        else:
            flight.set_result(item)
        finally:
            del self._flights[item_id]
        if item is None:
            ttl = self._cache.settings.not_found_ttl
            if ttl > 0:
                await self._store(key, NOT_FOUND_RANK, b"", ttl)
        else:
            await self._store(key, item.version, _encode(item), self._ttl())
        return item

    async def _store(
        self, key: str, rank: int, payload: bytes, ttl: float, *, keep: bool = False
    ) -> bool:
        """Compare-and-set the entry; whether Redis took the call (stored or refused).

        `keep`: the write of a committed change, kept in `pending` when it fails. A
        failed fill only costs a later miss.
        """
        try:
            await self._cache.put_if_newer(key, rank, payload, ttl)
        except CacheError as exc:
            if keep:
                self._keep(key, rank, payload, ttl)
            if not isinstance(exc, CacheBypassed):
                self._report("cache write failed", exc)
            return False
        return True

    def _keep(self, key: str, rank: int, payload: bytes, ttl: float) -> None:
        pending = self.pending
        kept = pending.get(key)
        if kept is None or kept[0] < rank:
            pending.pop(key, None)
            pending[key] = (rank, payload, ttl)
        if len(pending) > MAX_PENDING:
            dropped = next(iter(pending))
            del pending[dropped]
            log.error(
                "cache write dropped: too many pending; the entry expires by its TTL",
                extra={"key": dropped},
            )

    async def _repair(self, key: str) -> bool:
        """Write pending changes (`key`'s first); whether `key` has none left."""
        pending = self.pending
        keys = [key] if key in pending else []
        keys += [k for k in list(pending)[:_REPAIRS_PER_READ] if k != key]
        for one in keys:
            rank, payload, ttl = pending[one]
            if not await self._store(one, rank, payload, ttl):
                break
            if pending.get(one, (None,))[0] == rank:
                del pending[one]
        return key not in pending

    def _key(self, item_id: UUID) -> str:
        return self._cache.key(self.name, str(item_id))

    def _ttl(self) -> float:
        settings = self._cache.settings
        return settings.ttl * (1 - settings.ttl_jitter * self._random())

    @staticmethod
    def _report(message: str, exc: CacheError) -> None:
        held = _throttle.allow(message)
        if held is not None:
            log.warning(message, extra={"error": str(exc), "suppressed": held})
