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

# Keepalive that the server settings in server.py tolerate (PITFALLS C14).
_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


class DeadlineInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Sets each call's timeout to min(its own, remaining deadline - margin)."""

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

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        """Unary-unary call with the propagated deadline."""
        return await continuation(self._bounded(client_call_details), request)

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        """Unary-stream call with the propagated deadline."""
        return await continuation(self._bounded(client_call_details), request)

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        """Stream-unary call with the propagated deadline."""
        return await continuation(self._bounded(client_call_details), request_iterator)

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        """Stream-stream call with the propagated deadline."""
        return await continuation(self._bounded(client_call_details), request_iterator)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, inner: grpc.aio.UnaryUnaryClientInterceptor) -> None:
        self._inner = inner

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._inner.intercept_unary_unary(continuation, client_call_details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, inner: grpc.aio.UnaryStreamClientInterceptor) -> None:
        self._inner = inner

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._inner.intercept_unary_stream(continuation, client_call_details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, inner: grpc.aio.StreamUnaryClientInterceptor) -> None:
        self._inner = inner

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._inner.intercept_stream_unary(continuation, client_call_details, request)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, inner: grpc.aio.StreamStreamClientInterceptor) -> None:
        self._inner = inner

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._inner.intercept_stream_stream(continuation, client_call_details, request)


def _one_type_each(
    interceptors: Sequence[grpc.aio.ClientInterceptor],
) -> list[grpc.aio.ClientInterceptor]:
    # grpc.aio files an interceptor under the first call type it implements only
    # (an if/elif in Channel.__init__; grpc/grpc#31442, open), so one implementing
    # all four would silently skip the streaming calls. Give it one adapter per type.
    split: list[grpc.aio.ClientInterceptor] = []
    for interceptor in interceptors:
        adapters: list[grpc.aio.ClientInterceptor] = []
        if isinstance(interceptor, grpc.aio.UnaryUnaryClientInterceptor):
            adapters.append(_UnaryUnary(interceptor))
        if isinstance(interceptor, grpc.aio.UnaryStreamClientInterceptor):
            adapters.append(_UnaryStream(interceptor))
        if isinstance(interceptor, grpc.aio.StreamUnaryClientInterceptor):
            adapters.append(_StreamUnary(interceptor))
        if isinstance(interceptor, grpc.aio.StreamStreamClientInterceptor):
            adapters.append(_StreamStream(interceptor))
        split.extend(adapters if len(adapters) > 1 else [interceptor])
    return split


def create_channel(
    target: str,
    *,
    margin: float,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An insecure channel to `target` whose calls inherit the request deadline.

    Create it inside the running event loop (grpc.aio objects are loop-bound) and
    close it with `await channel.close()` at shutdown.
    """
    return grpc.aio.insecure_channel(
        target,
        options=[*_CHANNEL_OPTIONS, *options],
        interceptors=_one_type_each([DeadlineInterceptor(margin), *interceptors]),
    )
