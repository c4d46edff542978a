"""The request deadline: one absolute monotonic time in a context variable.

Inbound transports set it (`scope`, or `enter`/`leave` on the hot path);
everything that does I/O reads what is left (`budget`, `outbound_timeout`) and
whether it is `enforced`. A leaf module: imports only `errors`.
"""

from __future__ import annotations

import asyncio
import re
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, TypeAlias

from .errors import DeadlineExceeded

# (absolute deadline, the task it is enforced in or None): see `enforced()`. A weak
# reference: tasks spawned inside a request copy its context, and must not keep the
# request's finished task (its result, its traceback) alive.
_Scope: TypeAlias = "tuple[float, weakref.ref[asyncio.Task[Any]] | None]"
_deadline: ContextVar[_Scope | None] = ContextVar("deadline", default=None)

# What `enter` returns and `leave` takes.
EnterToken: TypeAlias = "Token[_Scope | None]"

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
    """Run the block with a deadline `timeout` seconds from now; yields the absolute deadline."""
    deadline = time.monotonic() + timeout
    token = _deadline.set((deadline, None))
    try:
        yield deadline
    finally:
        _deadline.reset(token)


def enter(timeout: float, *, enforced_in: asyncio.Task[Any] | None) -> EnterToken:
    """Set the deadline `timeout` seconds from now; `leave(token)` restores the previous one.

    `scope` without the context manager, for the request chain's hot path.
    `enforced_in`: a task the caller guarantees to cancel when the deadline passes.
    """
    task = None if enforced_in is None else weakref.ref(enforced_in)
    return _deadline.set((time.monotonic() + timeout, task))


def leave(token: EnterToken) -> None:
    """Restore the deadline `enter` replaced."""
    _deadline.reset(token)


def enforced() -> bool:
    """Whether the current task is cancelled when the current deadline passes.

    The request chain guarantees it for the handler task (its own timer, or gRPC,
    which cancels the handler at the client's deadline), so I/O there need not arm
    a timer of its own for the deadline: asyncio timers cost more than the
    handler code around them. Not for other tasks, even those that inherited the
    deadline (a task the handler spawned outlives its cancellation), nor under a
    plain `scope`.
    """
    current = _deadline.get()
    if current is None or current[1] is None:
        return False
    task = current[1]()
    return task is not None and task is _current_task()


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or None without one."""
    current = _deadline.get()
    if current is None:
        return None
    return current[0] - time.monotonic()


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


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop
        return None
