"""The request deadline: an absolute monotonic time in the request scope.

Inbound transports set it through the request chain (or `scope` for work outside
a request); everything that does I/O reads what is left (`budget`,
`outbound_timeout`) and whether it is `enforced`. A leaf module: imports only
`errors` and `scope`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from . import scope as request_scope
from .errors import DeadlineExceeded

# Outbound gRPC timeouts lose this fraction on top of the fixed per-hop margin:
# C-core rounds `grpc-timeout` up by up to ~1% when encoding it, so without it a
# deadline could grow from hop to hop (grpc timeout_encoding.h).
_ENCODING_SLACK = 0.01

_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def effective_timeout(client_timeout: float | None, *, default: float, maximum: float) -> float:
    """The time a request may take: the client's, else `default`, never above `maximum`."""
    if client_timeout is None:
        return min(default, maximum)
    return min(max(client_timeout, 0.0), maximum)


@contextmanager
def scope(timeout: float) -> Iterator[float]:
    """Run the block with a deadline `timeout` seconds from now; yields the absolute deadline.

    For work outside a request (a job, a script): nothing cancels the block at the
    deadline, so I/O below arms its own timers.
    """
    deadline = time.monotonic() + timeout
    token = request_scope.current.set(request_scope.Scope(deadline))
    try:
        yield deadline
    finally:
        request_scope.current.reset(token)


def enforced() -> bool:
    """Whether the current task is cancelled when the current deadline passes.

    The request chain guarantees it for the handler task while the request runs
    (its own alarm, or gRPC, which cancels the handler at the client's deadline), so
    I/O there need not arm a timer of its own: timers cost more than the handler
    code around them. Not for other tasks, even those that inherited the scope (a
    task the handler spawned outlives its cancellation), nor under `scope`.
    """
    current = request_scope.current.get()
    if current is None or current.enforced_in is None:
        return False
    # With the loop given, current_task() skips get_running_loop(), which makes a
    # getpid() system call on every call in Python 3.11.
    return current.enforced_in is asyncio.current_task(current.loop)


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or None without one."""
    current = request_scope.current.get()
    if current is None or current.deadline is None:
        return None
    return current.deadline - time.monotonic()


def budget(cap: float | None = None) -> float | None:
    """Seconds an operation may take: what is left of the deadline, at most `cap`.

    Raises DeadlineExceeded, before any I/O, when nothing is left. Returns `cap`
    (possibly None) outside a request.
    """
    left = remaining()
    if left is None:
        return cap
    if left <= 0:
        raise DeadlineExceeded("deadline exceeded before the operation started")
    return left if cap is None else min(left, cap)


def outbound_timeout(margin: float) -> float | None:
    """Timeout for a downstream call: what is left, less the per-hop margin and slack.

    Raises DeadlineExceeded when that leaves nothing, so the call is never sent.
    """
    left = remaining()
    if left is None:
        return None
    timeout = left - margin - left * _ENCODING_SLACK
    if timeout <= 0:
        raise DeadlineExceeded("deadline exceeded before the downstream call started")
    return timeout


def parse_grpc_timeout(value: str) -> float:
    """Parse a `grpc-timeout` header (1-8 digits and a unit of H M S m u n) into seconds.

    Units are case-sensitive: `M` is minutes, `m` milliseconds (PROTOCOL-HTTP2.md).
    Raises ValueError with a message fit for the caller.
    """
    match = _GRPC_TIMEOUT.fullmatch(value)
    if match is None:
        raise ValueError(
            f"malformed grpc-timeout {value!r}: "
            "expected 1 to 8 digits and a unit H, M, S, m, u or n"
        )
    digits, unit = match.groups()
    return int(digits) * _UNIT_SECONDS[unit]
