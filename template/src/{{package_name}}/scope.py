"""The request the current task serves: deadline, id, method, transport, trace, in one ContextVar.

The request chain sets it once per request; `deadlines` reads the deadline from it,
`logs` the request id, method and transport for every line written meanwhile. One
variable rather than one per field: each `ContextVar.set` and `reset` is paid on
every request. Tasks started inside a request copy the context, so they see the
same scope (but not its enforcement, see `deadlines.enforced`).

A leaf module: it imports nothing from the service.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any


class Scope:
    """What is known about the current request (empty strings outside one).

    The request chain's `Call` is a Scope itself: one object per request.
    """

    __slots__ = ("deadline", "enforced_in", "loop", "method", "request_id", "trace", "transport")

    def __init__(  # noqa: PLR0913 - one keyword per field
        self,
        deadline: float | None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        enforced_in: asyncio.Task[Any] | None = None,
        request_id: str = "",
        method: str = "",
        transport: str = "",
        trace: tuple[str, str] | None = None,
    ) -> None:
        # Absolute, in the loop's clock (time.monotonic).
        self.deadline = deadline
        self.loop = loop
        # The task that is cancelled when the deadline passes, while the request runs;
        # the chain clears it when the request ends, so tasks spawned by the request
        # (which keep this scope) arm timers of their own.
        self.enforced_in = enforced_in
        self.request_id = request_id
        self.method = method
        self.transport = transport
        # (trace id, span id) of the request's span when it is sampled, for the logs.
        self.trace = trace


current: ContextVar[Scope | None] = ContextVar("scope", default=None)
