"""PostgreSQL access: one asyncpg pool whose every wait is bounded by the request deadline.

`Database.connection()` is the only way to a connection. Inside a request it holds
the whole block to what is left of the deadline: when it expires the block is
cancelled, asyncpg sends PostgreSQL a CancelRequest so the query stops on the
server, and the connection goes back to the pool in a clean state (or is closed
when that cannot be done in time). Driver errors leave this module as
`errors.ServiceError`s with messages safe for callers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from . import deadlines
from .alarms import Alarm, Alarms
from .errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from .logs import Throttle
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
# Input the database refused: a value the driver cannot encode for a parameter
# (asyncpg's client-side DataError, a kind of InterfaceError, so it must be told
# apart from the connection failures above) or one PostgreSQL rejected (class 22).
_BAD_INPUT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions._base.DataError,  # noqa: SLF001 - asyncpg exports it under this name only
    asyncpg.DataError,
)
# What the caller gets for errors of the query rather than of the server (first match).
_MAPPED: tuple[tuple[tuple[type[BaseException], ...], Callable[[], ServiceError]], ...] = (
    # statement_timeout fired on the server: the backstop for our own deadline.
    ((asyncpg.QueryCanceledError,), lambda: DeadlineExceeded("database statement timed out")),
    (_BAD_INPUT, lambda: InvalidArgument.field("request", "a value was refused by the database")),
    ((asyncpg.UniqueViolationError,), lambda: AlreadyExists("the resource exists already")),
    # The transaction was rolled back as a whole: retrying it is safe.
    (
        (asyncpg.SerializationError, asyncpg.DeadlockDetectedError),
        lambda: Aborted("the transaction conflicted with another; retry it"),
    ),
    (
        (asyncpg.IntegrityConstraintViolationError,),
        lambda: FailedPrecondition("a constraint of the database refused the change"),
    ),
)
# A release after a failed block waits for PostgreSQL to cancel the query and reset
# the session; past what is left of the deadline, it gets this much longer before
# the connection is closed instead.
RELEASE_GRACE = 0.25
_unavailable_log = Throttle(interval=10.0)


def _server_settings(settings: DatabaseSettings) -> dict[str, str]:
    # Startup parameters, not `SET`s in `init=`: they are the session's defaults, so
    # they hold on every checkout, with DB__RESET_SESSION (whose RESET ALL would wipe a
    # SET after the first checkout) or without.
    return {
        "statement_timeout": str(int(settings.statement_timeout * 1000)),
        "idle_in_transaction_session_timeout": str(
            int(settings.idle_in_transaction_session_timeout * 1000)
        ),
        "application_name": "",
    }


async def _keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset of a returned connection when DB__RESET_SESSION is off: none.

    Settings the service relies on are startup parameters (`_server_settings`), which
    a reset would keep anyway; code here changes session state only for a
    transaction (SET LOCAL, transaction-scoped advisory locks).
    """
    del connection


class Database:
    """A pooled PostgreSQL client. Build it with `Database.connect`."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        settings: DatabaseSettings,
        alarms: Alarms | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.alarms = alarms or Alarms()
        # Connections leased through `connection()` and not yet returned.
        self.leased = 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        dsn: str,
        settings: DatabaseSettings,
        *,
        application_name: str = "",
        alarms: Alarms | None = None,
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
                    # asyncpg resets the session of every connection returned to the
                    # pool with one more query; by default only an open transaction is
                    # rolled back (asyncpg does that without a query when there is none).
                    reset=None if settings.reset_session else _keep_session,
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
        db = cls(pool, settings, alarms)
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
        return _Lease(self)

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
        pool = self.pool
        if pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size():
            return
        try:
            async with asyncio.timeout(timeout):
                async with self.pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except _UNREACHABLE as exc:
            raise Unavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc

    def stats(self) -> dict[str, int]:
        """Pool occupancy: open connections, idle ones and the configured maximum."""
        return {
            "size": self.pool.get_size(),
            "idle": self.pool.get_idle_size(),
            "max": self.pool.get_max_size(),
        }

    def terminate(self) -> None:
        """Cut every connection now (forced shutdown); `close()` then returns at once."""
        self.pool.terminate()

    async def close(self) -> None:
        """Close gracefully within `close_timeout`, then cut remaining connections.

        Call it only after the servers stopped and handler tasks finished: close
        waits for every acquired connection to come back, with no timeout of its own
        (MagicStack/asyncpg#290).
        """
        try:
            await asyncio.wait_for(self.pool.close(), self.settings.close_timeout)
        except TimeoutError:
            log.warning(
                "database pool did not close in time; terminating connections",
                extra={"timeout_s": self.settings.close_timeout},
            )
            self.pool.terminate()
        log.info("database pool closed")


class _Lease:
    """The `async with` of `Database.connection()`.

    A class rather than an @asynccontextmanager generator: it runs on every query's
    path, and an async generator costs a contextlib wrapper and asyncio's
    bookkeeping of async generators on top of the work.

    Timers: in a request's handler task the chain already cancels the task at the
    deadline (`deadlines.enforced`), so the block arms an alarm only for the acquire
    bound, and only when every connection is leased, so that the acquire has to
    wait, and the bound comes before the deadline. Elsewhere (a task the handler
    spawned, work under `deadlines.scope`) an alarm also covers the rest of the
    block up to the deadline.
    """

    __slots__ = ("_acquired", "_alarm", "_bounded", "_conn", "_db", "_task")
    _conn: Connection
    _alarm: Alarm | None
    _bounded: bool
    _task: asyncio.Task[Any] | None

    def __init__(self, db: Database) -> None:
        self._db = db
        self._acquired = False

    async def __aenter__(self) -> Connection:
        budget = deadlines.budget()  # DeadlineExceeded, before any I/O, if none is left
        db = self._db
        wait = db.settings.acquire_timeout
        enforced = deadlines.enforced()
        # The acquire bound ends a wait for a connection (UNAVAILABLE: the pool is
        # saturated) when it comes before the deadline (DEADLINE_EXCEEDED). With a
        # connection free, or room to open one, the acquire does not wait for others.
        waits = db.leased >= db.settings.max_size
        self._bounded = bounded = waits and (budget is None or wait < budget)
        self._alarm = None
        self._task = None
        db.leased += 1
        if bounded or (budget is not None and not enforced):
            alarms = db.alarms
            loop = alarms.loop
            started = loop.time()
            # With the loop given, current_task() skips a getpid() system call.
            self._task = task = asyncio.current_task(loop)
            if task is not None:
                first = wait if bounded or budget is None else budget
                self._alarm = alarms.arm(started + first, task)
        try:
            self._conn = await db.pool.acquire()
        except BaseException as exc:
            db.leased -= 1
            self._disarm()
            error = self._translate(exc)
            if error is exc:
                raise
            raise error from exc
        self._acquired = True
        if bounded:
            self._disarm()
            if budget is not None and not enforced and self._task is not None:
                # Past the acquire, the deadline, where nothing else enforces it.
                self._alarm = db.alarms.arm(started + budget, self._task)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                # The block ended normally, so the connection is idle: release is one
                # round trip (the session reset) to a server that just answered.
                # Unbounded, as asyncpg's own pool.fetchrow() does it; in a request
                # the deadline still cuts it.
                await self._db.pool.release(self._conn)
            else:
                await self._release_after(exc)
        except BaseException as failure:
            error = self._translate(failure)
            if error is failure:
                raise
            raise error from failure
        finally:
            self._db.leased -= 1
            self._disarm()
        if exc is not None:
            error = self._translate(exc)
            if error is not exc:
                raise error from exc

    async def _release_after(self, exc: BaseException) -> None:
        """Release after a failed block: bounded, the connection closed if it takes longer.

        The release waits for PostgreSQL to cancel an interrupted query and resets
        the session. It gets what is left of the deadline plus RELEASE_GRACE (at
        most DB__CONNECT_TIMEOUT); when that runs out, asyncpg closes the connection
        and the pool opens a new one later. Either way the caller gets the error the
        block earned, not the release's.
        """
        left = deadlines.remaining()
        timeout = self._db.settings.connect_timeout
        if left is not None:
            timeout = min(timeout, max(left, 0.0) + RELEASE_GRACE)
        try:
            await self._db.pool.release(self._conn, timeout=timeout)
        except Exception as failure:  # noqa: BLE001 - asyncpg closed the connection; reported
            held = _unavailable_log.allow("release")
            if held is not None:
                log.warning(
                    "database connection closed: it could not be released in time",
                    extra={
                        "error": f"{type(failure).__name__}: {failure}".rstrip(": "),
                        "after": type(exc).__name__,
                        "timeout_s": round(timeout, 3),
                        "suppressed": held,
                    },
                )

    def _disarm(self) -> None:
        if self._alarm is not None:
            self._alarm.disarm()

    def _translate(self, exc: BaseException) -> BaseException:
        """The error the caller gets for `exc`: a ServiceError, or `exc` itself."""
        alarm = self._alarm
        if alarm is not None and alarm.expired and isinstance(exc, asyncio.CancelledError):
            task = self._task
            if task is not None and task.cancelling():
                task.uncancel()
            if not self._acquired and self._bounded:
                return Unavailable("no database connection available; retry later")
            return DeadlineExceeded("deadline exceeded while waiting for the database")
        # Not ours, since our timers cancel: a timeout the block set itself, or a bug.
        # (While acquiring, it is asyncpg failing to connect in time: unavailable.)
        foreign_timeout = isinstance(exc, TimeoutError) and self._acquired
        if foreign_timeout or isinstance(exc, ServiceError | asyncio.CancelledError):
            return exc
        for kinds, error in _MAPPED:
            if isinstance(exc, kinds):
                return error()
        if isinstance(exc, _UNAVAILABLE):
            held = _unavailable_log.allow("unavailable")
            if held is not None:
                log.warning(
                    "database unavailable",
                    extra={"error": f"{type(exc).__name__}: {exc}", "suppressed": held},
                )
            return Unavailable("database unavailable")
        return exc
