"""The service's own database: created on request when PostgreSQL does not have it yet.

`migrate --create-database` calls `create_database` before migrating, so a fresh
PostgreSQL needs no `createdb` first. Creating a database takes a connection to
another one on the same server: the maintenance database `postgres` (or
`template1`, which every cluster has), with the credentials of `DATABASE_URL`.
This runs before any pool exists and imports nothing of the request path.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from .settings import redact

# Databases every PostgreSQL cluster has, to connect to while ours does not exist.
_MAINTENANCE = ("postgres", "template1")


class ProvisioningError(Exception):
    """The database could not be created; the message says why and what to do."""


def database_name(dsn: str) -> str:
    """The database `dsn` names in its path; raises ProvisioningError when it names none."""
    name = unquote(urlsplit(dsn).path.lstrip("/"))
    if not name:
        raise ProvisioningError(
            f"DATABASE_URL {redact(dsn)} names no database; put its name in the path "
            "(postgresql://user@host:5432/NAME)"
        )
    return name


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def _identifier(name: str) -> str:
    """`name` as a quoted SQL identifier: any characters, case kept."""
    return '"' + name.replace('"', '""') + '"'


async def _exists(dsn: str, *, timeout: float) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except asyncpg.InvalidCatalogNameError:
        return False
    await conn.close(timeout=timeout)
    return True


async def _maintenance_connection(dsn: str, *, timeout: float) -> asyncpg.Connection:
    for name in _MAINTENANCE:
        try:
            return await asyncpg.connect(_with_database(dsn, name), timeout=timeout)
        except asyncpg.InvalidCatalogNameError:
            continue
    raise ProvisioningError(
        f"the server at {redact(dsn)} has neither of the databases "
        f"{' nor '.join(_MAINTENANCE)} to connect to while creating ours; "
        "create the database with your administration tools"
    )


async def create_database(dsn: str, *, timeout: float) -> bool:
    """Create the database `dsn` names unless it exists; True when this call created it.

    Each connection and statement is bounded by `timeout`. A concurrent run creating
    the same database is not an error. Raises ProvisioningError naming the server and
    the cause when PostgreSQL is unreachable or refuses (for example a role without
    the CREATEDB privilege).
    """
    name = database_name(dsn)
    try:
        if await _exists(dsn, timeout=timeout):
            return False
        conn = await _maintenance_connection(dsn, timeout=timeout)
        try:
            await conn.execute(f"CREATE DATABASE {_identifier(name)}", timeout=timeout)
        except asyncpg.DuplicateDatabaseError:
            return False  # created by a concurrent run since we looked
        finally:
            await conn.close(timeout=timeout)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ProvisioningError(
            f"cannot create database {name!r} at {redact(dsn)}: the role may not create "
            "databases (it needs CREATEDB); ask an administrator to create it"
        ) from exc
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ProvisioningError(
            f"cannot create database {name!r} at {redact(dsn)}: {type(exc).__name__}: {exc}"
        ) from exc
    return True


def remedy(error: BaseException, command: str) -> str | None:
    """What the user can do about `error` when it means "the database does not exist".

    `command` is how the service was started (its console script), for the advice.
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, asyncpg.InvalidCatalogNameError):
            return f"create it and apply the migrations with `{command} migrate --create-database`"
        cause = cause.__cause__
    return None
