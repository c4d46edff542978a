"""The request deadline: one absolute monotonic time in a context variable.

Inbound transports set it (`scope`); everything that does I/O reads what is left
(`budget`, `outbound_timeout`). A leaf module: imports only `errors`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import DeadlineExceeded

_deadline: ContextVar[float | None] = ContextVar("deadline", default=None)

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
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or None without one."""
    deadline = _deadline.get()
    if deadline is None:
        return None
    return deadline - time.monotonic()


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
