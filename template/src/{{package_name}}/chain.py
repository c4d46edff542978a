"""The cross-cutting chain every request runs through, whatever its transport.

For each call: register the handler task (so shutdown can wait for it), set the
deadline (client's, else the default, capped at the maximum), bind the request
id to the logs, enforce the deadline, classify the outcome into one status code
and log one line. Transports (interceptors.py, later the HTTP gateway) adapt
their requests to `Chain.call` and their responses from `errors.ServiceError`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextlib import AbstractAsyncContextManager
from contextvars import Token
from dataclasses import dataclass, field
from types import TracebackType

from . import deadlines, logs
from .errors import Code, DeadlineExceeded, Internal, ServiceError
from .settings import DeadlineSettings

log = logging.getLogger(__name__)


class TaskTracker:
    """The set of running handler tasks.

    grpc.aio's `server.stop()` can return before aborted handlers finished their
    `finally` blocks (grpc/grpc#37239); shutdown waits on this set before it
    closes the pools those blocks still use.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[object]) -> None:
        """Track a handler task until `discard`."""
        self._tasks.add(task)

    def discard(self, task: asyncio.Task[object]) -> None:
        """Stop tracking a task."""
        self._tasks.discard(task)

    async def wait(self, timeout: float) -> int:
        """Wait up to `timeout` for tracked tasks to finish; returns how many still run."""
        pending = {t for t in self._tasks if t is not asyncio.current_task()}
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            return len(still)
        return 0


@dataclass(frozen=True)
class Transport:
    """How a transport meets the chain.

    `answered`: exceptions that already carry the transport's own reply (gRPC's
    AbortError) and pass through unchanged. `enforces_deadline`: the transport
    cancels the handler at the client's deadline itself (gRPC does), so the chain
    arms its own timer only when it changed that deadline (default or cap).
    """

    name: str
    answered: tuple[type[BaseException], ...] = ()
    enforces_deadline: bool = False


@dataclass
class Call:
    """One request as the chain sees it.

    A transport may set `code` for outcomes it produced itself (a handler that
    aborted with its own status).
    """

    method: str
    transport: str
    request_id: str
    timeout: float
    code: Code = Code.OK
    extra: dict[str, object] = field(default_factory=dict)


class Chain:
    """Deadline, task tracking, outcome classification and the per-request log line."""

    def __init__(self, settings: DeadlineSettings, tracker: TaskTracker) -> None:
        self._settings = settings
        self.tracker = tracker

    def call(
        self,
        method: str,
        *,
        transport: Transport,
        client_timeout: float | None,
        request_id: str | None,
    ) -> AbstractAsyncContextManager[Call]:
        """Run an `async with` block as the request `method` (the full gRPC method name).

        Errors leave as `ServiceError`: a DeadlineExceeded when the deadline ran
        out, an `Internal` (logged with its traceback) for anything unexpected.
        The transport's `answered` exceptions pass through unchanged;
        CancelledError is never swallowed.
        """
        timeout = deadlines.effective_timeout(
            client_timeout, default=self._settings.default, maximum=self._settings.maximum
        )
        call = Call(method, transport.name, request_id or _new_request_id(), timeout)
        own_timer = not transport.enforces_deadline or timeout != client_timeout
        return _Request(call, transport, self.tracker, own_timer=own_timer)


def _new_request_id() -> str:
    # Unique enough to find a request's lines, and no system call on the hot path
    # (os.urandom would make one, releasing the GIL to grpc's poller thread).
    return f"{random.getrandbits(64):016x}"


class _Request:
    """The `async with` of `Chain.call`.

    A class rather than an @asynccontextmanager generator: it runs twice per
    request and the generator machinery cost more than the work it wraps.
    """

    __slots__ = (
        "_call",
        "_deadline_token",
        "_rid_token",
        "_started",
        "_task",
        "_timer",
        "_tracker",
        "_transport",
    )
    _call: Call
    _transport: Transport
    _tracker: TaskTracker
    _timer: asyncio.Timeout | None
    _task: asyncio.Task[object] | None
    _rid_token: Token[str | None]
    _deadline_token: deadlines.EnterToken
    _started: float

    def __init__(
        self, call: Call, transport: Transport, tracker: TaskTracker, *, own_timer: bool
    ) -> None:
        self._call = call
        self._transport = transport
        self._tracker = tracker
        # gRPC cancels the handler at the client's deadline by itself; a timer is
        # needed only when the chain chose another deadline (default or cap).
        self._timer = asyncio.timeout(call.timeout) if own_timer else None

    async def __aenter__(self) -> Call:
        if self._timer is not None:
            await self._timer.__aenter__()  # first: the only step that can fail
        self._task = task = asyncio.current_task()
        if task is not None:
            self._tracker.add(task)
        self._rid_token = logs.request_id.set(self._call.request_id)
        self._deadline_token = deadlines.enter(self._call.timeout, enforced_in=task)
        self._started = time.perf_counter()
        return self._call

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        call = self._call
        try:
            if self._timer is not None:
                try:
                    # Turns the CancelledError of an expired timer into TimeoutError.
                    await self._timer.__aexit__(exc_type, exc, traceback)
                except TimeoutError as expired:
                    exc = expired
            self._classify(exc)
        finally:
            deadlines.leave(self._deadline_token)
            if self._task is not None:
                self._tracker.discard(self._task)
            if log.isEnabledFor(logging.INFO):
                _log_request(call, time.perf_counter() - self._started)
            logs.request_id.reset(self._rid_token)

    def _classify(self, exc: BaseException | None) -> None:
        """Set the call's code from how the block ended; raise what the caller gets.

        Returning leaves `exc` (if any) to propagate unchanged.
        """
        call = self._call
        if exc is None:
            return
        if isinstance(exc, TimeoutError) and self._timer is not None and self._timer.expired():
            call.code = Code.DEADLINE_EXCEEDED
            raise DeadlineExceeded("deadline exceeded") from None
        if isinstance(exc, ServiceError):
            call.code = exc.code
        elif isinstance(exc, asyncio.CancelledError):
            # The client went away or its deadline passed (gRPC cancels the task).
            expired = time.perf_counter() - self._started >= call.timeout
            call.code = Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED
        elif isinstance(exc, self._transport.answered) or not isinstance(exc, Exception):
            pass
        else:  # a bug, or someone else's TimeoutError
            call.code = Code.INTERNAL
            log.error("unhandled error", exc_info=exc, extra={"method": call.method})
            raise Internal("internal error") from exc


def _log_request(call: Call, duration: float) -> None:
    # The one log line of every request, on the hot path: built directly rather
    # than through log.info, which would walk the stack to find the caller.
    fields = {
        "method": call.method,
        "transport": call.transport,
        "code": call.code.name,
        "duration_ms": round(duration * 1000, 3),
        **call.extra,
    }
    if not logs.info_direct(log, "request", fields):
        record = log.makeRecord(
            log.name, logging.INFO, __file__, 0, "request", (), None, extra=fields
        )
        log.handle(record)
