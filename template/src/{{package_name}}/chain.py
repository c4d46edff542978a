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
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

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

    @asynccontextmanager
    async def call(
        self,
        method: str,
        *,
        transport: Transport,
        client_timeout: float | None,
        request_id: str | None,
    ) -> AsyncIterator[Call]:
        """Run the block as the request `method` (the full gRPC method name).

        Errors leave as `ServiceError`: a DeadlineExceeded when the deadline ran
        out, an `Internal` (logged with its traceback) for anything unexpected.
        The transport's `answered` exceptions pass through unchanged;
        CancelledError is never swallowed.
        """
        timeout = deadlines.effective_timeout(
            client_timeout, default=self._settings.default, maximum=self._settings.maximum
        )
        call = Call(method, transport.name, request_id or os.urandom(8).hex(), timeout)
        own_timer = not transport.enforces_deadline or timeout != client_timeout
        task = asyncio.current_task()
        if task is not None:
            self.tracker.add(task)
        rid_token = logs.request_id.set(call.request_id)
        started = time.perf_counter()
        try:
            with deadlines.scope(timeout):
                timer = asyncio.timeout(timeout if own_timer else None)
                try:
                    async with timer:
                        yield call
                except TimeoutError:
                    if not timer.expired():
                        raise  # someone else's timeout: a bug, answered INTERNAL below
                    raise DeadlineExceeded("deadline exceeded") from None
        except ServiceError as exc:
            call.code = exc.code
            raise
        except asyncio.CancelledError:
            # The client went away or its deadline passed (gRPC cancels the task).
            expired = time.perf_counter() - started >= timeout
            call.code = Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED
            raise
        except transport.answered:
            raise
        except Exception as exc:
            call.code = Code.INTERNAL
            log.exception("unhandled error", extra={"method": method})
            raise Internal("internal error") from exc
        finally:
            if task is not None:
                self.tracker.discard(task)
            if log.isEnabledFor(logging.INFO):
                _log_request(call, time.perf_counter() - started)
            logs.request_id.reset(rid_token)


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
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, "request", (), None, extra=fields)
    log.handle(record)
