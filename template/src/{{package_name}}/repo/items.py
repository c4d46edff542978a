"""PostgreSQL implementation of `domain.items.ItemRepository`."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from ..domain.items import Cursor, Item
from ..errors import Aborted

if TYPE_CHECKING:
    from ..db import Connection, Database, Record

_COLUMNS = "id, name, description, create_time, update_time, version"
# Inserts a create tries before giving up when, each time, the item its request_id
# names is deleted between the insert that found it and the read that fetches it.
CREATE_ATTEMPTS = 3


def _item(row: Record) -> Item:
    return Item(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        version=row["version"],
    )


class PostgresItemRepository:
    """Items in the `items` table (migrations/0001_create_items.sql)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, name: str, description: str, request_id: UUID | None) -> Item:
        """Insert; a repeated request_id returns the row the first call inserted.

        Raises Aborted when the row of that request_id keeps being deleted between
        the insert that found it and the read that fetches it (CREATE_ATTEMPTS times).
        """

        async def insert(conn: Connection) -> Record | None:
            row = await conn.fetchrow(
                f"INSERT INTO items (name, description, request_id) VALUES ($1, $2, $3) "
                f"ON CONFLICT (request_id) DO NOTHING RETURNING {_COLUMNS}",
                name,
                description,
                request_id,
            )
            if row is None:
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS} FROM items WHERE request_id = $1", request_id
                )
            return row

        # With a request_id the insert is idempotent (a repeat finds the first row),
        # so a lost connection may be retried; without one, a repeat would insert twice.
        for _ in range(CREATE_ATTEMPTS):
            row = await self._db.run(insert, idempotent=request_id is not None)
            if row is not None:
                return _item(row)
            # The item of this request_id was deleted in between: insert again.
        raise Aborted("the item of this request_id was deleted while it was created; retry")

    async def get(self, item_id: UUID) -> Item | None:
        """The item, or None."""
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM items WHERE id = $1", item_id, idempotent=True
        )
        return None if row is None else _item(row)

    async def list_after(self, cursor: Cursor | None, limit: int) -> list[Item]:
        """Up to `limit` items after `cursor` in (create_time, id) order."""
        if cursor is None:
            rows = await self._db.fetch(
                f"SELECT {_COLUMNS} FROM items ORDER BY create_time, id LIMIT $1",
                limit,
                idempotent=True,
            )
        else:
            rows = await self._db.fetch(
                f"SELECT {_COLUMNS} FROM items WHERE (create_time, id) > ($1, $2) "
                "ORDER BY create_time, id LIMIT $3",
                cursor.create_time,
                cursor.id,
                limit,
                idempotent=True,
            )
        return [_item(row) for row in rows]

    async def update(
        self, item_id: UUID, changes: dict[str, str], expected_version: int | None
    ) -> Item | None:
        """Apply `changes`; None when the item is missing or not at expected_version."""
        row = await self._db.fetchrow(
            "UPDATE items SET "
            "name = CASE WHEN $2 THEN $3 ELSE name END, "
            "description = CASE WHEN $4 THEN $5 ELSE description END, "
            "version = version + 1, update_time = clock_timestamp() "
            f"WHERE id = $1 AND ($6::bigint IS NULL OR version = $6) RETURNING {_COLUMNS}",
            item_id,
            "name" in changes,
            changes.get("name", ""),
            "description" in changes,
            changes.get("description", ""),
            expected_version,
        )
        return None if row is None else _item(row)

    async def delete(self, item_id: UUID, expected_version: int | None) -> bool:
        """Delete; False when the item is missing or not at expected_version."""
        status = await self._db.execute(
            "DELETE FROM items WHERE id = $1 AND ($2::bigint IS NULL OR version = $2)",
            item_id,
            expected_version,
        )
        return status != "DELETE 0"
