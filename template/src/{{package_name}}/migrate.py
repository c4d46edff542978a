"""Schema migrations: plain SQL files in `migrations/`, applied once each, in order.

Applied versions are recorded with a checksum in `schema_migrations`. A session
advisory lock serialises concurrent runs, so two instances starting together
apply each migration exactly once. Each migration runs in its own transaction.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .db import Connection, Database

log = logging.getLogger(__name__)

_FILE = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9_]+)\.sql")
_TABLE = "schema_migrations"
# Advisory lock key: stable for this service and distinct from other services
# sharing the database.
_LOCK_KEY = zlib.crc32(f"{__package__}.migrations".encode())


class MigrationError(Exception):
    """The migrations on disk and in the database disagree."""


@dataclass(frozen=True)
class Migration:
    """One SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the SQL, to detect files edited after they were applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        """`0001_create_items`, as the file is named."""
        return f"{self.version:04d}_{self.name}"


def discover() -> list[Migration]:
    """All migrations shipped in the package, by version; refuses malformed names."""
    found: list[Migration] = []
    for entry in files(f"{__package__}.migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE.fullmatch(entry.name)
        if match is None:
            raise MigrationError(
                f"migration file {entry.name!r} must be named NNNN_lowercase_name.sql"
            )
        found.append(Migration(int(match["version"]), match["name"], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


async def _applied(conn: Connection) -> dict[int, str]:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _TABLE)
    if not exists:
        return {}
    rows = await conn.fetch(f"SELECT version, checksum FROM {_TABLE}")  # noqa: S608
    return {row["version"]: row["checksum"] for row in rows}


def _check(known: list[Migration], applied: dict[int, str]) -> list[Migration]:
    by_version = {m.version: m for m in known}
    for version, checksum in applied.items():
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {version:04d}, which this build does not know: "
                "is an older version of the service running against a newer schema?"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"migration {migration.label} was edited after it was applied; "
                "add a new migration instead"
            )
    return [m for m in known if m.version not in applied]


async def pending(db: Database) -> list[Migration]:
    """Migrations not yet applied; raises MigrationError on a mismatch."""
    async with db.connection() as conn:
        return _check(discover(), await _applied(conn))


async def apply(db: Database) -> list[Migration]:
    """Apply every pending migration and return those this call applied."""
    known = discover()
    async with db.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_TABLE} ("
                " version integer PRIMARY KEY,"
                " name text NOT NULL,"
                " checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            todo = _check(known, await _applied(conn))
            for migration in todo:
                async with conn.transaction():
                    # Schema changes may legitimately outlast the request backstop.
                    await conn.execute("SET LOCAL statement_timeout = 0")
                    await conn.execute(migration.sql)
                    await conn.execute(
                        f"INSERT INTO {_TABLE} (version, name, checksum) VALUES ($1, $2, $3)",  # noqa: S608
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                log.info("migration applied", extra={"migration": migration.label})
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return todo
