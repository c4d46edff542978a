"""Schema migrations: plain SQL files in `migrations/`, applied once each, in order.

Applied versions are recorded with a checksum in `schema_migrations`. A session
advisory lock serialises concurrent runs, so two instances starting together
apply each migration exactly once. Each migration runs in its own transaction.

Waiting for the lock: a run that finds the lock taken waits for the holder to
finish, even when that takes longer than `DB__STATEMENT_TIMEOUT` (the request
backstop, which does not apply to this wait), but at most `LOCK_WAIT` (15 minutes;
`apply(lock_wait=)` changes it). Past that it fails with `MigrationLockTimeoutError`
naming the holder's backend pid, and `migrate` exits 1. The bound is for a holder
that hangs with its session open, which would otherwise block every later run
forever. A crashed holder needs no bound: PostgreSQL releases a session lock when
the session ends, at once when the process dies (if the whole host vanished, when
`idle_in_transaction_session_timeout` or TCP keepalive ends the session). Fifteen
minutes is far beyond the seconds a run normally takes; a holder that is slow but
healthy costs the waiting instance one failed run, and its retry (a restarted job
or init container) waits again and finds nothing left to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    from .db import Connection, Database

log = logging.getLogger(__name__)

_FILE = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9_]+)\.sql")
_TABLE = "schema_migrations"
# Advisory lock key: stable for this service and distinct from other services
# sharing the database (in `pg_locks`: locktype 'advisory', classid 0, objid LOCK_KEY).
LOCK_KEY = zlib.crc32(f"{__package__}.migrations".encode())
# Longest wait for another run's lock, in seconds: see the module docstring.
LOCK_WAIT = 15 * 60.0
# lock_timeout is an int4 number of milliseconds.
_MAX_LOCK_WAIT = (2**31 - 1) / 1000


class MigrationError(Exception):
    """The migrations cannot be applied: disk and database disagree, or the lock is held."""


class MigrationLockTimeoutError(MigrationError):
    """Another run held the migration lock for longer than the wait allowed."""


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


async def _holder(conn: Connection) -> str:
    """Who holds the migration lock, for messages: `pid 123 (acme-migrate)`, or `?`."""
    row = await conn.fetchrow(
        "SELECT l.pid, a.application_name FROM pg_locks l"
        " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0"
        " AND l.objid = $1::bigint::oid AND l.objsubid = 1"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        LOCK_KEY,
    )
    if row is None:
        return "?"  # released since we looked
    return f"pid {row['pid']} ({row['application_name'] or 'no application_name'})"


async def _lock(conn: Connection, wait: float) -> None:
    """Take the session advisory lock, waiting at most `wait` seconds for another run."""
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        return
    holder = await _holder(conn)
    log.info(
        "waiting for another migration run to finish",
        extra={"holder": holder, "lock_wait_s": wait},
    )
    try:
        # The wait is one statement, so the session's statement_timeout (the request
        # backstop, possibly under a second) would cancel it: lift it and bound the
        # wait with lock_timeout instead. Both with set_config(..., true), i.e. SET
        # LOCAL: they end with this transaction, so the session handed back to the
        # pool is unchanged (the pool's RESET ALL on release is not relied on). The
        # lock is a session lock: it outlives the transaction's COMMIT.
        async with conn.transaction():
            await conn.execute("SELECT set_config('statement_timeout', '0', true)")
            await conn.execute(
                "SELECT set_config('lock_timeout', $1, true)", str(max(1, round(wait * 1000)))
            )
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    except asyncpg.LockNotAvailableError as exc:
        raise MigrationLockTimeoutError(
            f"another migration run ({await _holder(conn)}) has held the migration lock "
            f"for more than {wait:g} s; if it is hung, end it with pg_terminate_backend(pid) "
            "and run migrate again"
        ) from exc


async def apply(db: Database, *, lock_wait: float = LOCK_WAIT) -> list[Migration]:
    """Apply every pending migration and return those this call applied.

    Waits up to `lock_wait` seconds for a concurrent run to finish (it then usually
    finds nothing left to do); raises MigrationLockTimeoutError past that.
    """
    if not 0 < lock_wait <= _MAX_LOCK_WAIT:
        raise ValueError(f"lock_wait must be in (0, {_MAX_LOCK_WAIT:g}] seconds: {lock_wait}")
    known = discover()
    async with db.connection() as conn:
        # Not inside the try: a run that never got the lock must not unlock. Should a
        # cancellation race with the grant, the end of the session releases it: the
        # migrate command closes its pool when it finishes.
        await _lock(conn, lock_wait)
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
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return todo
