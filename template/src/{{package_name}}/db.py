"""PostgreSQL access: one asyncpg pool whose every wait is bounded by the request deadline.

`Database.connection()` is the only way to a connection. Inside a request it holds
the whole block to what is left of the deadline: when it expires the block is
cancelled, asyncpg sends PostgreSQL a CancelRequest so the query stops on the
server, and the connection goes back to the pool in a clean state (or is closed
when that cannot be done in time). Driver errors leave this module as
`errors.ServiceError`s with messages safe for callers.

Resilience: every block goes through the circuit breaker of dependency "postgres"
(an open circuit fails fast with UNAVAILABLE without touching the pool), and the
one retry layer of PostgreSQL is here (asyncpg retries nothing by itself). Only
work the caller declares safe to repeat is retried, inside the deadline and under
the retry budget: `fetch*(..., idempotent=True)` and `run(work, idempotent=True)`
after the connection died under it, and `run(work, transaction=True,
retry_conflicts=True)` after PostgreSQL rolled the transaction back as a whole
(serialization failure 40001, deadlock 40P01). A write is never retried after a
failure that leaves unknown whether it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from . import deadlines, guards
from .alarms import Alarm, Alarms
from .breaker import Breaker, CircuitOpen, OnChange, Outcome, outcome_of
from .errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from .leases import Held, Leases, acquiring_site
from .logs import Throttle
from .retry import Retry, RetryBudget
from .scope import current as current_scope
from .settings import BreakerSettings, DatabaseSettings, RetrySettings, redact
from .tracing import LoggedQuery, QuerySpans

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

Record = asyncpg.Record
T = TypeVar("T")
# The dependency's name in breaker and retry metrics and logs.
DEPENDENCY = "postgres"

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
# A connection that died under a statement, or just before it (terminated backend,
# restart, failover): asyncpg learns of it only when the statement is sent, or
# finds itself mid-way through reading the server's goodbye ("cannot switch to
# state"), or has already handed the dead connection back to the pool, which
# detaches the lease (an InterfaceError: "connection has been released back to the
# pool", "connection is closed"). Whether the statement ran is unknown.
_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InternalClientError,
    asyncpg.InterfaceError,
)
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
        lambda: Conflict("the transaction conflicted with another; retry it"),
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


class ConnectionLost(Unavailable):
    """The connection died under the work; whether a statement ran is unknown."""


class NoConnection(Unavailable):
    """No connection freed up within DB__ACQUIRE_TIMEOUT: our congestion, not PostgreSQL's."""


class Conflict(Aborted):
    """PostgreSQL rolled the transaction back as a whole (40001, 40P01): nothing of it ran."""


@dataclass(frozen=True, slots=True)
class Guards:
    """The circuit breaker and the retries of PostgreSQL (None: switched off)."""

    breaker: Breaker | None = None
    retry: Retry | None = None
    budget: RetryBudget | None = None

    @classmethod
    def configured(
        cls,
        settings: DatabaseSettings,
        retry: RetrySettings,
        breaker: BreakerSettings,
        *,
        on_change: OnChange | None = None,
    ) -> Guards:
        """What `DB__RETRY*`, `DB__BREAKER`, `RETRY__*` and `BREAKER__*` ask for."""
        retried, budget = (
            guards.retries(retry, max_attempts=settings.retry_attempts)
            if settings.retry and settings.retry_attempts > 1
            else (None, None)
        )
        return cls(
            breaker=guards.breaker(DEPENDENCY, breaker, on_change=on_change)
            if settings.breaker
            else None,
            retry=retried,
            budget=budget,
        )


def _is_lost(exc: BaseException) -> bool:
    """Whether a leased connection failed with `exc` because it died (`_LOST`)."""
    # A value the driver cannot encode is an InterfaceError too, and the query's fault.
    return isinstance(exc, _LOST) and not isinstance(exc, _BAD_INPUT)


def _lost(error: Exception) -> bool:
    return isinstance(error, ConnectionLost)


def _lost_or_conflict(error: Exception) -> bool:
    return isinstance(error, ConnectionLost | Conflict)


def _conflict(error: Exception) -> bool:
    return isinstance(error, Conflict)


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

    def __init__(  # noqa: PLR0913 - the pool's parts, each optional but the first two
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        settings: DatabaseSettings,
        alarms: Alarms | None = None,
        guards: Guards | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        leases: Leases | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.alarms = alarms or Alarms()
        guards = guards or Guards()
        self.breaker = guards.breaker
        self.retry = guards.retry
        self._budget = guards.budget
        # The breaker's clock (a fake one in tests).
        self.clock = clock
        # Connections leased through `connection()` and not yet returned.
        self.leased = 0
        # Who holds them, the waits for one, connections replaced (leases.py).
        self.leases = leases or Leases(threshold=settings.held_too_long)
        # CLIENT spans of the statements of sampled requests (None: not traced).
        self.queries: QuerySpans | None = None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        dsn: str,
        settings: DatabaseSettings,
        *,
        application_name: str = "",
        alarms: Alarms | None = None,
        guards: Guards | None = None,
    ) -> AsyncIterator[Database]:
        """Open the pool (min_size connections, bounded by connect_timeout), close it on exit.

        Raises Unavailable when PostgreSQL cannot be reached in time. On exit the pool
        is closed gracefully within `close_timeout`, then terminated.
        """
        server_settings = _server_settings(settings) | {"application_name": application_name}
        leases = Leases(threshold=settings.held_too_long)
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
                    # Counts every connection opened: the replacements of dead ones.
                    init=leases.connection_opened,
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
        db = cls(pool, settings, alarms, guards, leases=leases)
        try:
            async with leases.watched(db.alarms.loop.time):
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

    async def run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        idempotent: bool = False,
        transaction: bool = False,
        retry_conflicts: bool = False,
    ) -> T:
        """`await work(conn)` on a pooled connection (in a transaction with `transaction`).

        With `idempotent` (running `work` twice has the effect of running it once:
        a read, an insert keyed by a request id), a run whose connection died under
        it is retried on a fresh connection. With `transaction` and
        `retry_conflicts` (`work` has no effect outside the transaction), a
        transaction PostgreSQL rolled back on a serialization failure or a
        deadlock is run again. Retries fit in the deadline and the retry budget
        (DB__RETRY_ATTEMPTS attempts at most); anything else fails at once.
        """
        retry, budget = self.retry, self._budget
        if transaction and retry_conflicts:
            retryable = _lost_or_conflict if idempotent else _conflict
        elif idempotent:
            retryable = _lost
        else:
            retry = None
        if retry is None or budget is None:
            return await self._once(work, transaction=transaction)
        # The first attempt inline (Retry.begin, then succeeded or resume): no retry
        # coroutines on the path of a call that succeeds. The lease holds it to the
        # deadline where nothing else does, as Retry's own attempts are held.
        retry.begin(budget)
        started = retry.clock()
        try:
            result = await self._once(work, transaction=transaction)
        except Exception as error:  # noqa: BLE001 - Retry.resume re-raises what it does not retry
            return await retry.resume(
                error,
                partial(self._once, work, transaction=transaction),
                retryable=retryable,
                budget=budget,
            )
        retry.succeeded(started)
        return result

    async def _once(self, work: Callable[[Connection], Awaitable[T]], *, transaction: bool) -> T:
        async with _Lease(self) as conn:
            if not transaction:
                return await work(conn)
            async with conn.transaction():
                return await work(conn)

    async def fetch(self, query: str, *args: Any, idempotent: bool = False) -> list[Record]:
        """Run a query and return all rows; `idempotent`: retried as in `run`."""
        return await self._statement(_fetch, query, args, idempotent=idempotent)

    async def fetchrow(self, query: str, *args: Any, idempotent: bool = False) -> Record | None:
        """Run a query and return its first row, if any; `idempotent`: retried as in `run`."""
        return await self._statement(_fetchrow, query, args, idempotent=idempotent)

    async def fetchval(self, query: str, *args: Any, idempotent: bool = False) -> Any:
        """Run a query and return the first column of its first row; see `run`."""
        return await self._statement(_fetchval, query, args, idempotent=idempotent)

    async def _statement(
        self,
        statement: Callable[[Connection], Callable[..., Awaitable[T]]],
        query: str,
        args: tuple[Any, ...],
        *,
        idempotent: bool,
    ) -> T:
        """`statement` on a leased connection; `run`'s retries, first attempt inline."""
        retry, budget = self.retry, self._budget
        if not idempotent or retry is None or budget is None:
            async with _Lease(self) as conn:
                return await statement(conn)(query, *args)
        retry.begin(budget)
        started = retry.clock()
        try:
            async with _Lease(self) as conn:
                result = await statement(conn)(query, *args)
        except Exception as error:  # noqa: BLE001 - Retry.resume re-raises what it does not retry

            def work(conn: Connection) -> Awaitable[T]:
                return statement(conn)(query, *args)

            attempt = partial(self._once, work, transaction=False)
            return await retry.resume(error, attempt, retryable=_lost, budget=budget)
        retry.succeeded(started)
        return result

    async def execute(self, query: str, *args: Any) -> str:
        """Run a statement and return its status tag (never retried)."""
        async with _Lease(self) as conn:
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

    def state(self) -> dict[str, Any]:
        """The pool now: occupancy, waits, connections replaced, leases held too long.

        `waiting` counts leases waiting for a connection (a free one or a new one);
        `acquire_wait_s` is the histogram of those waits (cumulative buckets).
        """
        pool, leases = self.pool, self.leases
        size, idle = pool.get_size(), pool.get_idle_size()
        wait = leases.wait
        return {
            "size": size,
            "idle": idle,
            "in_use": size - idle,
            "max": pool.get_max_size(),
            "leased": self.leased,
            "waiting": leases.waiting,
            "acquire_wait_s": {
                "count": sum(wait.counts),
                "sum": wait.sum,
                "buckets": dict(wait.buckets()),
            },
            "connections_opened": leases.opened,
            "connections_lost": leases.lost,
            "connections_discarded": leases.discarded,
            "held_too_long_total": leases.held_too_long,
            "held_too_long_threshold_s": leases.threshold,
        }

    def debug(self) -> dict[str, Any]:
        """`state()` and the leases held past the threshold now (for /debug/pool)."""
        return self.state() | {"long_held": self.leases.long_held(self.alarms.loop.time())}

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


# The statements of `Database._statement`: the connection's own method, so that a query
# pays no coroutine of ours between the caller and asyncpg.
def _fetch(conn: Connection) -> Callable[..., Awaitable[list[Record]]]:
    return conn.fetch


def _fetchrow(conn: Connection) -> Callable[..., Awaitable[Record | None]]:
    return conn.fetchrow


def _fetchval(conn: Connection) -> Callable[..., Awaitable[Any]]:
    return conn.fetchval


class _Lease(Held):
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

    __slots__ = ("_acquired", "_alarm", "_bounded", "_conn", "_db", "_logger")
    _conn: Connection
    _alarm: Alarm | None
    _bounded: bool

    def __init__(self, db: Database) -> None:
        self._db = db
        self._acquired = False
        self._logger: Callable[[LoggedQuery], None] | None = None

    async def __aenter__(self) -> Connection:
        budget = deadlines.budget()  # DeadlineExceeded, before any I/O, if none is left
        db = self._db
        breaker = db.breaker
        if breaker is not None and not breaker.allow(db.clock()):
            raise CircuitOpen("database unavailable (circuit open)")
        wait = db.settings.acquire_timeout
        enforced = deadlines.enforced()
        # The acquire bound ends a wait for a connection (UNAVAILABLE: the pool is
        # saturated) when it comes before the deadline (DEADLINE_EXCEEDED). With a
        # connection free, or room to open one, the acquire does not wait for others.
        waits = db.leased >= db.settings.max_size
        self._bounded = bounded = waits and (budget is None or wait < budget)
        self._alarm = None
        db.leased += 1
        alarms = db.alarms
        loop = alarms.loop
        started = loop.time()
        # With the loop given, current_task() skips a getpid() system call.
        self.task = task = asyncio.current_task(loop)
        if task is not None and (bounded or (budget is not None and not enforced)):
            first = wait if bounded or budget is None else budget
            self._alarm = alarms.arm(started + first, task)
        leases = db.leases
        leases.waiting += 1
        try:
            self._conn = await db.pool.acquire()
        except BaseException as exc:
            leases.waiting -= 1
            db.leased -= 1
            self._disarm()
            error = self._translate(exc)
            self._record(error)
            if error is exc:
                raise
            raise error from exc
        self._acquired = True
        leases.waiting -= 1
        self.since = now = loop.time()
        leases.wait.observe(now - started)
        # Who holds it, for a report if it is held too long (leases.py).
        self.scope = scope = current_scope.get()
        self.reported = False
        self.acquired_at = acquiring_site() if leases.threshold > 0 else None
        leases.held.add(self)
        if scope is not None and scope.trace is not None and db.queries is not None:
            # A sampled request: a span for each of its statements. Unsampled
            # requests add nothing, and asyncpg then skips its query log entirely.
            self._logger = logger = db.queries.logger()
            self._conn.add_query_logger(logger)
        if bounded:
            self._disarm()
            if budget is not None and not enforced and task is not None:
                # Past the acquire, the deadline, where nothing else enforces it.
                self._alarm = alarms.arm(started + budget, task)
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._logger is not None:
            # A lease the pool detached (its connection died) refuses every call;
            # its connection is discarded, logger and all.
            with contextlib.suppress(asyncpg.InterfaceError):
                self._conn.remove_query_logger(self._logger)
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
            self._record(error)
            if error is failure:
                raise
            raise error from failure
        finally:
            self._db.leased -= 1
            self._db.leases.held.discard(self)
            self._disarm()
        if exc is None:
            self._record(None)
            return
        error = self._translate(exc)
        self._record(error)
        if error is not exc:
            raise error from exc

    def _record(self, error: BaseException | None) -> None:
        """Tell the breaker how the block ended (`error` as the caller gets it)."""
        db = self._db
        breaker = db.breaker
        if breaker is None:
            return
        if error is None:
            outcome = Outcome.SUCCESS
        elif isinstance(error, NoConnection | ConnectionLost):
            # Our pool is saturated; or one connection died, as every pooled one does
            # once after a restart or a failover, while the server may be fine: the
            # next connect (a retry, the next call) tells whether it is down.
            outcome = Outcome.IGNORED
        elif isinstance(error, asyncpg.PostgresError):
            outcome = Outcome.SUCCESS  # PostgreSQL answered, with an error of the query
        else:
            outcome = outcome_of(error)
        breaker.record(outcome, db.clock())

    async def _release_after(self, exc: BaseException) -> None:
        """Release after a failed block: bounded, the connection closed if it takes longer.

        The release waits for PostgreSQL to cancel an interrupted query and resets
        the session. It gets what is left of the deadline plus RELEASE_GRACE (at
        most DB__CONNECT_TIMEOUT); when that runs out, asyncpg closes the connection
        and the pool opens a new one later. Either way the caller gets the error the
        block earned, not the release's.
        """
        if _is_lost(exc):
            # A connection died under a statement: after a restart, a failover or
            # backends terminated in bulk, its idle siblings are likely dead as well.
            # The pool replaces each at its next checkout (a connect) rather than hand
            # a retry one that fails again.
            await self._db.pool.expire_connections()
        left = deadlines.remaining()
        timeout = self._db.settings.connect_timeout
        if left is not None:
            timeout = min(timeout, max(left, 0.0) + RELEASE_GRACE)
        try:
            await self._db.pool.release(self._conn, timeout=timeout)
        except Exception as failure:  # noqa: BLE001 - asyncpg closed the connection; reported
            self._db.leases.discarded += 1
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
            task = self.task
            if task is not None and task.cancelling():
                task.uncancel()
            if not self._acquired and self._bounded:
                return NoConnection("no database connection available; retry later")
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
            # Lost under the block, not while connecting: a retry on a fresh one may cure it.
            lost = self._acquired and _is_lost(exc)
            if lost:
                self._db.leases.lost += 1
            return (
                ConnectionLost("database connection lost")
                if lost
                else Unavailable("database unavailable")
            )
        return exc
