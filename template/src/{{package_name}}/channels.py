"""Outbound gRPC channels: the request deadline on every call, retries and a breaker.

Python gRPC does not propagate deadlines (grpc/grpc#17489): without this, a call
made inside a handler has no deadline at all. The interceptor gives each call
what is left of the current deadline less a per-hop margin (deadlines.py), for
all four call types, and fails the call before any I/O when nothing is left.

With a `Downstream` (`create_channel(downstream=...)`), unary calls also go through
a circuit breaker of the target and, for methods whose proto says they are safe to
repeat (`option idempotency_level = IDEMPOTENT` or `NO_SIDE_EFFECTS`), retries of
UNAVAILABLE with backoff inside the deadline and under a retry budget. This is the
channel's one retry layer: no gRPC service-config retry policy is set (grpc's
transparent retries of calls that never reached the server stay on, as they cannot
run a call twice).

With `metrics`, every call is counted (`grpc_client_*`, one count per call whatever
its retries); with `tracing`, every attempt gets a CLIENT span from
opentelemetry-instrumentation-grpc's interceptors, which pass the current trace on
in `traceparent` metadata.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Callable, Sequence
from functools import partial
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from . import deadlines, guards
from .breaker import Breaker, CircuitOpen, OnChange, Outcome
from .errors import Code, DeadlineExceeded, ServiceError
from .metrics import CallStats, Metrics
from .retry import Retry, RetryBudget
from .settings import BreakerSettings, RetrySettings
from .tracing import Tracing

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


_SAFE_TO_REPEAT = frozenset(
    {descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT}
)
# What a failed call says about the target (breaker.Outcome): it is down, or it
# answered. Our own deadline running out, or the caller cancelling, says nothing.
_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE})
_IGNORED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def safe_to_repeat(method: str) -> bool:
    """Whether `method` (`/pkg.Service/Method`) is declared idempotent in its proto."""
    name = method.lstrip("/").replace("/", ".")
    try:
        found = descriptor_pool.Default().FindMethodByName(name)
    except KeyError:
        return False  # not a method this process has the descriptor of: assume not
    return found.GetOptions().idempotency_level in _SAFE_TO_REPEAT


class Downstream:
    """Retries and a circuit breaker for the unary calls to one target.

    `retry` and `budget` go together (None: no retries); `breaker` may be None.
    Methods are judged once each by their proto's idempotency level.
    """

    def __init__(
        self,
        *,
        retry: Retry | None = None,
        budget: RetryBudget | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        if (retry is None) != (budget is None):
            raise ValueError("retry and budget go together")
        self.retry = retry
        self.budget = budget
        self.breaker = breaker
        self._repeatable: dict[str, bool] = {}

    @classmethod
    def configured(
        cls,
        name: str,
        retry: RetrySettings,
        breaker: BreakerSettings,
        *,
        on_change: OnChange | None = None,
    ) -> Downstream:
        """The retries and breaker of the settings (`RETRY__*`, `BREAKER__*`) for `name`."""
        retried, budget = guards.retries(retry)
        return cls(
            retry=retried,
            budget=budget,
            breaker=guards.breaker(name, breaker, on_change=on_change),
        )

    def repeatable(self, method: str | bytes) -> bool:
        """Whether calls of `method` may be retried (cached per method)."""
        name = method.decode() if isinstance(method, bytes) else method
        known = self._repeatable.get(name)
        if known is None:
            known = self._repeatable[name] = safe_to_repeat(name)
        return known


def _transient(error: Exception) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in _FAILURES


def _outcome(error: BaseException | None) -> Outcome:
    if error is None:
        return Outcome.SUCCESS
    if isinstance(error, grpc.aio.AioRpcError):
        code = error.code()
        if code in _FAILURES:
            return Outcome.FAILURE
        return Outcome.IGNORED if code in _IGNORED else Outcome.SUCCESS
    if isinstance(error, DeadlineExceeded | CircuitOpen):
        return Outcome.IGNORED
    return Outcome.FAILURE if isinstance(error, OSError) else Outcome.IGNORED


class _Resilient(grpc.aio.UnaryUnaryClientInterceptor):
    """The breaker and retries of a Downstream around each unary call.

    Outermost: every attempt goes through the deadline interceptor again and gets
    what is left of the deadline then.
    """

    def __init__(self, target: str, downstream: Downstream) -> None:
        self._target = target
        self._downstream = downstream

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        downstream = self._downstream
        breaker = downstream.breaker
        if breaker is not None and not breaker.allow(time.monotonic()):
            raise CircuitOpen(f"{self._target} unavailable (circuit open)")

        async def attempt() -> Any:
            return await (await continuation(client_call_details, request))

        retry, budget = downstream.retry, downstream.budget
        try:
            if (
                retry is None
                or budget is None
                or not downstream.repeatable(client_call_details.method)
            ):
                response = await attempt()
            else:
                response = await retry.run(attempt, retryable=_transient, budget=budget)
        except BaseException as error:
            if breaker is not None:
                breaker.record(_outcome(error), time.monotonic())
            raise
        if breaker is not None:
            breaker.record(Outcome.SUCCESS, time.monotonic())
        return response


_CODES = {code.name: code for code in Code}


def _code(status: grpc.StatusCode) -> Code:
    return _CODES.get(status.name, Code.UNKNOWN)


class _Counted:
    """Counts the calls of each method in `metrics` (grpc_client_*)."""

    kind = "unary"

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def _start(self, details: ClientCallDetails) -> CallStats:
        # bytes from grpc.aio, whatever the stubs say.
        method: str | bytes = details.method
        name = method.decode() if isinstance(method, bytes) else method
        stats = self._metrics.client(name, self.kind)
        stats.started += 1
        return stats


class _CountedUnaryUnary(_Counted, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        stats = self._start(client_call_details)
        started = time.monotonic()
        code = Code.UNKNOWN
        try:
            call = await continuation(client_call_details, request)
            # Awaited here to learn its status; the caller's own await of the call
            # returns the same response (or raises the same error) at once.
            await call
            code = Code.OK
        except grpc.aio.AioRpcError as error:
            code = _code(error.code())
            return call
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        except ServiceError as error:  # refused before any I/O: no deadline left, circuit open
            code = error.code
            raise
        finally:
            stats.finished(code, time.monotonic() - started)
        return call


async def _count_stream(stats: CallStats, started: float, call: Any) -> None:
    try:
        code = _code(await call.code())
    except asyncio.CancelledError:
        code = Code.CANCELLED
    stats.finished(code, time.monotonic() - started)


def _on_done(stats: CallStats, started: float, call: Any) -> None:
    # The status of a finished call is there already, but only through a coroutine.
    asyncio.get_running_loop().create_task(_count_stream(stats, started, call))


class _CountedStream(_Counted):
    async def _intercept(
        self, continuation: Callable[..., Any], details: ClientCallDetails, request: Any
    ) -> Any:
        stats = self._start(details)
        started = time.monotonic()
        try:
            call = await continuation(details, request)
        except BaseException:
            stats.finished(Code.UNKNOWN, time.monotonic() - started)
            raise
        call.add_done_callback(partial(_on_done, stats, started))
        return call


class _CountedUnaryStream(_CountedStream, grpc.aio.UnaryStreamClientInterceptor):
    kind = "server_stream"

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _CountedStreamUnary(_CountedStream, grpc.aio.StreamUnaryClientInterceptor):
    kind = "client_stream"

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


class _CountedStreamStream(_CountedStream, grpc.aio.StreamStreamClientInterceptor):
    kind = "bidi_stream"

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request_iterator)


def metrics_interceptors(metrics: Metrics) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that count calls (grpc_client_*), one for each call type."""
    return [
        _CountedUnaryUnary(metrics),
        _CountedUnaryStream(metrics),
        _CountedStreamUnary(metrics),
        _CountedStreamStream(metrics),
    ]


def create_channel(  # noqa: PLR0913 - keyword-only parts, each optional
    target: str,
    *,
    margin: float,
    downstream: Downstream | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An insecure channel to `target` whose calls inherit the request deadline.

    With `downstream`, unary calls also get its breaker and retries (see the
    module docstring): a call refused by an open breaker raises `CircuitOpen` (an
    UNAVAILABLE ServiceError) without reaching the target. `metrics` counts the
    calls; `tracing` gives each attempt a span and passes the trace on. Extra
    `interceptors` run last; give grpc.aio one class per call type (see above).

    Create it inside the running event loop (grpc.aio objects are loop-bound) and
    close it with `await channel.close()` at shutdown.
    """
    # Outermost first: the count of a call, its breaker and retries, then per
    # attempt the deadline left and the attempt's span.
    chain: list[grpc.aio.ClientInterceptor] = []
    if metrics is not None:
        chain += metrics_interceptors(metrics)
    if downstream is not None:
        chain.append(_Resilient(target, downstream))
    chain += deadline_interceptors(margin)
    if tracing is not None:
        chain += tracing.client_interceptors()
    return grpc.aio.insecure_channel(
        target, options=[*_CHANNEL_OPTIONS, *options], interceptors=[*chain, *interceptors]
    )
