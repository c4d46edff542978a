"""PostgreSQL access: one asyncpg pool whose every wait is bounded by the request deadline.

`Database.connection()` is the only way to a connection. Inside a request it holds
the whole block to what is left of the deadline: when it expires the block is
cancelled, asyncpg sends PostgreSQL a CancelRequest so the query stops on the
server, and the connection goes back to the pool in a clean state. Driver errors
leave this module as `errors.ServiceError`s with messages safe for callers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from . import deadlines
from .errors import DeadlineExceeded, Unavailable
from .settings import DatabaseSettings, redact

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

Record = asyncpg.Record

# Errors that mean "the server or the network failed", not "the query was wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,  # the backend was terminated or the server shuts down
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
    # What asyncpg raises when the server ends a session under a query in flight (a
    # terminated backend), depending on when it notices: "cannot switch to state ..".
    asyncpg.InternalClientError,
)
_UNREACHABLE: tuple[type[BaseException], ...] = (TimeoutError, *_UNAVAILABLE)


def _server_settings(settings: DatabaseSettings) -> dict[str, str]:
    # Startup parameters, not `SET`s in `init=`: the pool's RESET ALL on release
    # would wipe a SET after the first checkout.
    return {
        "statement_timeout": str(int(settings.statement_timeout * 1000)),
        "idle_in_transaction_session_timeout": str(
            int(settings.idle_in_transaction_session_timeout * 1000)
        ),
        "application_name": "",
    }


class Database:
    """A pooled PostgreSQL client. Build it with `Database.connect`."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], settings: DatabaseSettings) -> None:
        self._pool = pool
        self._settings = settings

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, dsn: str, settings: DatabaseSettings, *, application_name: str = ""
    ) -> AsyncIterator[Database]:
        """Open the pool (min_size connections, bounded by connect_timeout), close it on exit.

        Raises Unavailable when PostgreSQL cannot be reached in time. On exit the pool
        is closed gracefully within `close_timeout`, then terminated.
        """
        server_settings = _server_settings(settings) | {"application_name": application_name}
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    dsn,
                    min_size=settings.min_size,
                    max_size=settings.max_size,
                    max_inactive_connection_lifetime=settings.max_inactive_connection_lifetime,
                    timeout=settings.connect_timeout,
                    # No command_timeout: requests are bounded by their deadline
                    # (connection() below) and PostgreSQL's statement_timeout is the
                    # backstop; a client-side timer per query would only add cost.
                    server_settings=server_settings,
                ),
                timeout=settings.connect_timeout * 2,
            )
        except _UNREACHABLE as exc:
            raise Unavailable(
                f"cannot reach PostgreSQL at {redact(dsn)}: {type(exc).__name__}: {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            # Reached, and refused: no such database or role, a wrong password, a
            # server setting PostgreSQL does not accept.
            raise Unavailable(
                f"PostgreSQL at {redact(dsn)} refused the connection: {type(exc).__name__}: {exc}"
            ) from exc
        db = cls(pool, settings)
        try:
            yield db
        finally:
            await db.close()

    def connection(self) -> AbstractAsyncContextManager[Connection]:
        """A pooled connection for the block, all of it bounded by the current deadline.

        Raises DeadlineExceeded when the deadline has passed (before any I/O) or
        expires inside the block or a statement hits `statement_timeout`; Unavailable
        when no connection frees up within `acquire_timeout` or the server fails.
        """
        return _Lease(self._pool, self._settings)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """Like `connection()`, inside a transaction committed when the block succeeds."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def fetch(self, query: str, *args: Any) -> list[Record]:
        """Run a query and return all rows."""
        async with self.connection() as conn:
            return await conn.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Record | None:
        """Run a query and return its first row, if any."""
        async with self.connection() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        """Run a query and return the first column of its first row."""
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        """Run a statement and return its status tag."""
        async with self.connection() as conn:
            return await conn.execute(query, *args)

    async def ping(self, *, timeout: float) -> None:
        """Check PostgreSQL answers within `timeout`; raises Unavailable otherwise.

        A pool whose every connection is in use is busy, not down, and passes: under
        a load spike readiness must not take every replica out of rotation at once.
        Requests that find no free connection get UNAVAILABLE by themselves
        (`acquire_timeout`); if PostgreSQL hangs, their deadlines free the
        connections, and the next check connects and fails.
        """
        pool = self._pool
        if pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size():
            return
        try:
            async with asyncio.timeout(timeout):
                async with self._pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except _UNREACHABLE as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def stats(self) -> dict[str, int]:
        """Pool occupancy: open connections, idle ones and the configured maximum."""
        return {
            "size": self._pool.get_size(),
            "idle": self._pool.get_idle_size(),
            "max": self._pool.get_max_size(),
        }

    def terminate(self) -> None:
        """Cut every connection now (forced shutdown); `close()` then returns at once."""
        self._pool.terminate()

    async def close(self) -> None:
        """Close gracefully within `close_timeout`, then cut remaining connections.

        Call it only after the servers stopped and handler tasks finished: close
        waits for every acquired connection to come back, with no timeout of its own
        (MagicStack/asyncpg#290).
        """
        try:
            await asyncio.wait_for(self._pool.close(), self._settings.close_timeout)
        except TimeoutError:
            log.warning(
                "database pool did not close in time; terminating connections",
                extra={"timeout_s": self._settings.close_timeout},
            )
            self._pool.terminate()
        log.info("database pool closed")


class _Lease:
    """The `async with` of `Database.connection()`.

    A class rather than an @asynccontextmanager generator: it runs on every query's
    path, and an async generator costs a contextlib wrapper and asyncio's
    bookkeeping of async generators on top of the work.
    """

    __slots__ = ("_acquired", "_budget", "_conn", "_pool", "_settings", "_timer", "_wait")
    _conn: Connection
    _budget: float | None
    _wait: float
    _timer: asyncio.Timeout

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], settings: DatabaseSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._acquired = False

    async def __aenter__(self) -> Connection:
        budget = deadlines.budget()  # DeadlineExceeded, before any I/O, if none is left
        wait = self._settings.acquire_timeout
        if budget is not None:
            wait = min(wait, budget)
        started = asyncio.get_running_loop().time()
        self._budget, self._wait = budget, wait
        # One timer for the whole block: first the acquire bound, then the deadline.
        # (asyncpg's own `acquire(timeout=)` would run the wait in an extra task.)
        self._timer = timer = asyncio.timeout_at(started + wait)
        await timer.__aenter__()
        try:
            self._conn = await self._pool.acquire()
        except BaseException as exc:
            await self._finish(exc)
            raise
        self._acquired = True
        # Past the acquire, the deadline. When the request chain enforces it
        # (deadlines.enforced), a second timer would only add cost.
        if budget is None or deadlines.enforced():
            timer.reschedule(None)
        else:
            timer.reschedule(started + budget)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        failed: BaseException | None = None
        try:
            if exc is None:
                # The block ended normally, so the connection is idle: release is one
                # round trip (the session reset) to a server that just answered.
                # Unbounded, as asyncpg's own pool.fetchrow() does it: that timer
                # cost about 3% of a GetItem's CPU.
                await self._pool.release(self._conn)
            else:
                # A release budget of its own, not what is left of the deadline:
                # release waits for the CancelRequest of an interrupted query and
                # resets the session; starved, it kills the connection instead, in
                # a shielded task whose error nobody retrieves.
                await self._pool.release(self._conn, timeout=self._settings.connect_timeout)
        except BaseException as error:  # noqa: BLE001 - translated or re-raised below
            failed = error
        await self._finish(failed or exc)
        if failed is not None:
            raise failed

    async def _finish(self, exc: BaseException | None) -> None:
        """Leave the timer; raise the ServiceError that `exc` (if any) stands for.

        Returns when `exc` should leave unchanged.
        """
        timer = self._timer
        try:
            # Turns the CancelledError of an expired timer into TimeoutError.
            await timer.__aexit__(
                None if exc is None else type(exc),
                exc,
                None if exc is None else exc.__traceback__,
            )
        except TimeoutError as expired:
            exc = expired
        if exc is None:
            return
        if isinstance(exc, TimeoutError):
            if not timer.expired():
                return  # not ours: leaves as the bug it is
            if not self._acquired and (self._budget is None or self._wait < self._budget):
                raise Unavailable("no database connection available; retry later") from exc
            raise DeadlineExceeded("deadline exceeded while waiting for the database") from exc
        if isinstance(exc, asyncpg.QueryCanceledError):
            # statement_timeout fired on the server: the backstop for our own deadline.
            raise DeadlineExceeded("database statement timed out") from exc
        if isinstance(exc, _UNAVAILABLE):
            log.warning("database unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise Unavailable("database unavailable") from exc
