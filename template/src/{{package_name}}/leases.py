"""Who holds the pool's connections: waits for one, connections replaced, leases held too long.

`db.py` registers every connection it leases here (a `Held`, the lease itself, so
nothing is allocated for it) and counts the waits and the connections it drops.
A watcher task looks at the held leases a few times per threshold and reports each
one held longer than the threshold once: one log line with the RPC method that
holds it and the code location that acquired it, and one count. Imports only
`scope` and `metrics` from the service.

The location is taken when the connection is leased (while the threshold is on):
the first frame up the call stack outside db.py, retry.py and contextlib, a walk of
a few frames. It cannot wait for the report: by then the holder is suspended, and
a gRPC handler's await chain runs through grpc's compiled coroutines, which
`Task.get_stack()` cannot see into.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from .metrics import Histogram
from .scope import Scope

log = logging.getLogger(__name__)

# Bucket bounds of the wait for a pooled connection, in seconds: from an idle
# connection handed over at once (well under a millisecond) to DB__ACQUIRE_TIMEOUT
# (2 s by default) and a connect timeout past it.
ACQUIRE_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# Frames of these files are machinery, not the code that holds a connection.
_HERE = Path(__file__).parent
_POOL_CODE = frozenset({str(_HERE / "db.py"), str(_HERE / "retry.py"), contextlib.__file__})
_STACK_FRAMES = 12


class Held:
    """A connection leased and not yet returned: when, by which request and task."""

    __slots__ = ("acquired_at", "reported", "scope", "since", "task")

    def __init__(self) -> None:
        # The code that acquired the connection, and the line it was on then.
        self.acquired_at: tuple[CodeType, int] | None = None
        self.since = 0.0
        self.scope: Scope | None = None
        self.task: asyncio.Task[Any] | None = None
        self.reported = False

    def describe(self, now: float) -> dict[str, Any]:
        """What an operator needs to find the holder: method, age, code location, stack."""
        scope = self.scope
        task = self.task
        stack = _stack(task) if task is not None and not task.done() else []
        return {
            "method": scope.method if scope is not None and scope.method else "",
            "transport": scope.transport if scope is not None else "",
            "request_id": scope.request_id if scope is not None else "",
            "held_s": round(now - self.since, 3),
            "task": task.get_name() if task is not None else "",
            "site": _site(self.acquired_at),
            "stack": stack,
        }


class Leases:
    """The pool's leases and counters; one per Database, read by metrics and /debug/pool."""

    __slots__ = (
        "discarded",
        "held",
        "held_too_long",
        "lost",
        "opened",
        "threshold",
        "wait",
        "waiting",
    )

    def __init__(self, *, threshold: float) -> None:
        # Seconds a lease may be held before it is reported; 0: never reported.
        self.threshold = threshold
        self.held: set[Held] = set()
        self.waiting = 0  # leases waiting for a connection (a free one or a new one)
        self.wait = Histogram(ACQUIRE_BUCKETS)
        self.held_too_long = 0  # leases reported
        self.opened = 0  # connections the pool opened, the first ones included
        self.lost = 0  # connections that died under a statement (dropped by the pool)
        self.discarded = 0  # connections closed because they could not be released in time

    async def connection_opened(self, connection: object) -> None:
        """The pool's `init`: count a new connection (a replacement, after the first ones)."""
        del connection
        self.opened += 1

    def long_held(self, now: float) -> list[dict[str, Any]]:
        """The leases held longer than the threshold now, oldest first."""
        if self.threshold <= 0:
            return []
        late = [held for held in self.held if now - held.since > self.threshold]
        late.sort(key=lambda held: held.since)
        return [held.describe(now) for held in late]

    def sweep(self, now: float) -> int:
        """Report, once each, the leases held past the threshold; returns how many."""
        reported = 0
        for held in tuple(self.held):
            if held.reported or now - held.since <= self.threshold:
                continue
            held.reported = True
            reported += 1
            self.held_too_long += 1
            found = held.describe(now)
            log.warning(
                "database connection held too long",
                extra={
                    "held_method": found["method"],
                    "held_s": found["held_s"],
                    "threshold_s": self.threshold,
                    "site": found["site"],
                    "task": found["task"],
                    "held_request_id": found["request_id"],
                },
            )
        return reported

    @asynccontextmanager
    async def watched(self, clock: Callable[[], float]) -> AsyncIterator[None]:
        """Sweep every quarter of the threshold (at most every second) for the block."""
        if self.threshold <= 0:
            yield
            return
        interval = min(max(self.threshold / 4, 0.01), 1.0)

        async def watch() -> None:
            while True:
                await asyncio.sleep(interval)
                self.sweep(clock())

        task = asyncio.create_task(watch(), name="db-lease-watch")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait([task])


def _stack(task: asyncio.Task[Any]) -> list[str]:
    """`file:line in function` of the task's frames, innermost last, at most a dozen."""
    out = [
        f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_qualname}"
        for frame in task.get_stack()
    ]
    return out[-_STACK_FRAMES:]


def acquiring_site() -> tuple[CodeType, int] | None:
    """The code outside the pool that is leasing a connection now, and its line."""
    frame: FrameType | None = sys._getframe(2)  # noqa: SLF001 - past this and __aenter__
    while frame is not None and frame.f_code.co_filename in _POOL_CODE:
        frame = frame.f_back
    return None if frame is None else (frame.f_code, frame.f_lineno)


def _site(acquired_at: tuple[CodeType, int] | None) -> str:
    """`file:line in function` of the code that acquired the connection."""
    if acquired_at is None:
        return "unknown"
    code, line = acquired_at
    return f"{code.co_filename}:{line} in {code.co_qualname}"
