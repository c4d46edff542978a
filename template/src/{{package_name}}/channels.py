"""Outbound gRPC channels that carry the request deadline to every downstream call.

Python gRPC does not propagate deadlines (grpc/grpc#17489): without this, a call
made inside a handler has no deadline at all. The interceptor gives each call
what is left of the current deadline less a per-hop margin (deadlines.py), for
all four call types, and fails the call before any I/O when nothing is left.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Sequence
from typing import Any

import grpc

from . import deadlines

ClientCallDetails = grpc.aio.ClientCallDetails

# Keepalive that the server settings in server.py tolerate: a client that pings more
# often than the server allows is sent GOAWAY too_many_pings and loses its connection
# (https://github.com/grpc/grpc/blob/master/doc/keepalive.md).
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


class _Deadline:
    """Sets a call's timeout to min(its own, remaining deadline - margin)."""

    def __init__(self, margin: float) -> None:
        self._margin = margin

    def _bounded(self, details: ClientCallDetails) -> ClientCallDetails:
        # Computed here, at call time: aio turns `timeout` into a deadline only when
        # the call is created (grpc/aio/_interceptor.py `_timeout_to_deadline`).
        budget = deadlines.outbound_timeout(self._margin)
        if budget is None or (details.timeout is not None and details.timeout <= budget):
            return details
        return ClientCallDetails(
            details.method, budget, details.metadata, details.credentials, details.wait_for_ready
        )


# One class per call type: grpc.aio files an interceptor under the first type it
# implements only (an if/elif in Channel.__init__, grpc/grpc#31442), so a single
# class implementing all four would silently skip the streaming calls.


class _UnaryUnary(_Deadline, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._bounded(client_call_details), request)


class _UnaryStream(_Deadline, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._bounded(client_call_details), request)


class _StreamUnary(_Deadline, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        return await continuation(self._bounded(client_call_details), request_iterator)


class _StreamStream(_Deadline, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        return await continuation(self._bounded(client_call_details), request_iterator)


def deadline_interceptors(margin: float) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that pass the request deadline on, one for each call type."""
    return [_UnaryUnary(margin), _UnaryStream(margin), _StreamUnary(margin), _StreamStream(margin)]


def create_channel(
    target: str,
    *,
    margin: float,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An insecure channel to `target` whose calls inherit the request deadline.

    Extra `interceptors` run after the deadline ones; give grpc.aio one class per
    call type (see above).

    Create it inside the running event loop (grpc.aio objects are loop-bound) and
    close it with `await channel.close()` at shutdown.
    """
    return grpc.aio.insecure_channel(
        target,
        options=[*_CHANNEL_OPTIONS, *options],
        interceptors=[*deadline_interceptors(margin), *interceptors],
    )
