"""The cross-cutting chain every request runs through, whatever its transport.

For each call: admit it or refuse it (rate limits, load shedding), register the
handler task (so shutdown can wait for it), set the deadline (client's, else the
default, capped at the maximum) and the request scope (deadline, request id, method,
transport, trace: see scope.py), open the server span when tracing is on, enforce
the deadline, classify the outcome into one status code, count it (metrics.py) and
log one line (all of them, or a sample of the successful fast ones). Transports (handlers.py
for gRPC, the HTTP gateway) resolve one `Endpoint` per method at startup and call
`Endpoint.begin` and `Call.end` around the handler.

`begin` and `end` are plain methods rather than an `async with`: a request pays no
extra coroutine for them, and every mechanism that joins the chain (limits,
metrics, tracing) joins these two methods instead of adding a wrapper of its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import Token
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from opentelemetry.trace import Span

from . import logs
from . import scope as request_scope
from .alarms import Alarm, Alarms
from .errors import Code, DeadlineExceeded, Internal, ResourceExhausted, ServiceError, Unavailable
from .metrics import MethodStats, Metrics
from .ratelimit import RateLimiter
from .settings import DeadlineSettings
from .shedding import Permit, Shedder, outcome_of
from .tracing import RequestSpans, end_span, ids

log = logging.getLogger(__name__)

# A cancellation this close to the request's deadline is the deadline expiring.
EXPIRY_SLACK = 0.05


class TaskTracker:
    """The set of running handler tasks.

    grpc.aio's `server.stop()` can return before aborted handlers finished their
    `finally` blocks (grpc/grpc#37239); shutdown waits on this set before it
    closes the pools those blocks still use.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        # The set's own methods: called twice per request, without a Python frame.
        self.add: Callable[[asyncio.Task[Any]], None] = self._tasks.add
        self.discard: Callable[[asyncio.Task[Any]], None] = self._tasks.discard

    def __len__(self) -> int:
        return len(self._tasks)

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
    arms its own alarm only when it changed that deadline (default or cap).
    """

    name: str
    answered: tuple[type[BaseException], ...] = ()
    enforces_deadline: bool = False


def _new_request_id() -> str:
    # Unique enough to find a request's lines, and no system call on the hot path
    # (os.urandom would make one, releasing the GIL to grpc's poller thread).
    return random.getrandbits(64).to_bytes(8).hex()


class Admission:
    """Whether a request may start: rate limits, then load shedding. Never waits.

    A refused request gets a ServiceError at once, with the delay to wait before a
    retry: RESOURCE_EXHAUSTED over a rate limit (the caller's quota: retrying
    elsewhere does not help), UNAVAILABLE when shed (the service is overloaded; the
    call never started, so retrying it, ideally on another replica, is safe).
    Refusals are not logged one by one: a line every 10 s counts them.
    """

    def __init__(
        self,
        *,
        limiter: RateLimiter | None,
        shedder: Shedder | None,
        retry_after: float,
        caller_header: str = "",
    ) -> None:
        self.limiter = limiter
        self.shedder = shedder
        self.retry_after = retry_after
        # The metadata key (HTTP header) naming the caller, for per-caller limits.
        self.caller_header = caller_header
        self.refused = {"rate_limit": 0, "shed": 0}
        self._log = logs.Throttle(interval=10.0)

    def admit(self, method: str, caller: str | None, now: float, remaining: float) -> Permit | None:
        """A Permit to release when the request ends (None without a shedder).

        Raises ResourceExhausted or Unavailable when the request is refused.
        """
        limiter = self.limiter
        if limiter is not None:
            wait = limiter.try_acquire(method, caller, now)
            if wait:
                self._refuse("rate_limit")
                raise ResourceExhausted(f"rate limit of {method} exceeded", retry_after=wait)
        shedder = self.shedder
        if shedder is None:
            return None
        permit = shedder.try_acquire(now, remaining)
        if permit is None:
            self._refuse("shed")
            raise Unavailable("overloaded; retry later", retry_after=self.retry_after)
        return permit

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1
        held = self._log.allow(reason)
        if held is not None:
            log.warning(
                "requests refused" if reason == "rate_limit" else "load shed",
                extra={"reason": reason, "refused_since_last_line": held + 1},
            )


@dataclass(frozen=True)
class LogSampling:
    """Which request lines are written: every error and slow call, `ok_ratio` of the rest."""

    ok_ratio: float = 1.0
    slow: float = 1.0  # seconds


class Chain:
    """Deadline, admission, task tracking, metrics, the server span, the request log line."""

    def __init__(  # noqa: PLR0913 - the chain's parts, each optional but the first two
        self,
        settings: DeadlineSettings,
        tracker: TaskTracker,
        alarms: Alarms | None = None,
        admission: Admission | None = None,
        *,
        metrics: Metrics | None = None,
        spans: RequestSpans | None = None,
        sampling: LogSampling | None = None,
    ) -> None:
        self.settings = settings
        self.tracker = tracker
        self.admission = admission
        self.metrics = metrics
        self.spans = spans
        self.sampling = sampling or LogSampling()
        self._alarms = alarms

    @property
    def alarms(self) -> Alarms:
        """The alarm clock of the running loop (created on first use inside it)."""
        if self._alarms is None:
            self._alarms = Alarms()
        return self._alarms

    def endpoint(self, method: str, kind: str = "unary") -> Endpoint:
        """The chain of one method (the full gRPC name, `/pkg.Service/Method`).

        `kind`: unary, client_stream, server_stream or bidi_stream (the metrics'
        `grpc_type`). Resolve it once per method at startup: it holds what does not
        change from call to call.
        """
        return Endpoint(self, method, kind)

    def call(
        self,
        method: str,
        *,
        transport: Transport,
        client_timeout: float | None,
        request_id: str | None,
    ) -> AbstractAsyncContextManager[Call]:
        """Run an `async with` block as a request of `method` (for tests and tools).

        Errors leave as `ServiceError`s (`Call.end` says which); the transport's
        `answered` exceptions and CancelledError leave unchanged.
        """
        return _block(self.endpoint(method), transport, client_timeout, request_id)


@asynccontextmanager
async def _block(
    endpoint: Endpoint, transport: Transport, client_timeout: float | None, request_id: str | None
) -> AsyncIterator[Call]:
    call = endpoint.begin(transport, client_timeout, request_id)
    try:
        yield call
    except BaseException as exc:
        error = call.end(exc)
        if error is None:
            raise
        raise error from (None if error is exc else exc)
    else:
        call.end(None)


class Endpoint:
    """One method as the chain serves it."""

    __slots__ = (
        "_alarms",
        "_chain",
        "_default",
        "_maximum",
        "_metrics",
        "_span_attributes",
        "_span_name",
        "_stats",
        "admission",
        "kind",
        "log_ratio",
        "loop",
        "method",
        "shedder",
        "slow",
        "spans",
        "tracker",
    )

    def __init__(self, chain: Chain, method: str, kind: str) -> None:
        self.method = method
        self.kind = kind
        self._metrics = chain.metrics
        # Metrics by transport name, created on a transport's first call.
        self._stats: dict[str, MethodStats] = {}
        self.spans = chain.spans
        # The span's name and attributes by transport (OpenTelemetry's RPC conventions).
        self._span_name = method.lstrip("/")
        service, _, name = self._span_name.partition("/")
        self._span_attributes = {
            transport: {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "transport": transport,
            }
            for transport in ("grpc", "http")
        }
        self.log_ratio = chain.sampling.ok_ratio
        self.slow = chain.sampling.slow
        self.tracker = chain.tracker
        self._chain = chain
        self._default = min(chain.settings.default, chain.settings.maximum)
        self._maximum = chain.settings.maximum
        self.admission = chain.admission
        self.shedder = None if chain.admission is None else chain.admission.shedder
        self._alarms: Alarms | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin(  # noqa: PLR0913 - what a transport knows of a request, in one call
        self,
        transport: Transport,
        client_timeout: float | None,
        request_id: str | None,
        *,
        caller: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Call:
        """Start a call in the current task; the caller must `end` it, whatever happens.

        `caller` names the client for per-caller rate limits; `traceparent` and
        `tracestate` are the W3C trace context it sent. Raises the ServiceError of a
        refused request (rate limit, load shedding): then there is no call to end.
        """
        alarms = self._alarms
        if alarms is None:
            alarms = self._alarms = self._chain.alarms
            self.loop = alarms.loop
        loop = alarms.loop
        now = loop.time()
        if client_timeout is None:
            timeout = self._default
        else:
            timeout = min(max(client_timeout, 0.0), self._maximum)
        stats = None
        if self._metrics is not None:
            stats = self._stats.get(transport.name) or self._new_stats(transport)
        admission = self.admission
        permit = None
        if admission is not None:
            permit = self._admit(admission, caller, now, timeout, stats)
        if stats is not None:
            stats.started += 1
            stats.deadline.observe(timeout)
        # With the loop given, current_task() skips a getpid() system call (Python 3.11).
        task = asyncio.current_task(loop)
        call = Call(
            self,
            transport,
            request_id or _new_request_id(),
            started=now,
            timeout=timeout,
            task=task,
            permit=permit,
            stats=stats,
        )
        if task is not None:
            self.tracker.add(task)
            # gRPC cancels the handler at the client's deadline by itself; an alarm is
            # needed only when the chain chose another deadline (default or cap).
            if not transport.enforces_deadline or timeout != client_timeout:
                call._alarm = alarms.arm(now + timeout, task)  # noqa: SLF001 - Call's own setup
        if self.spans is not None:
            self._trace(call, traceparent, tracestate)
        call._token = request_scope.current.set(call)  # noqa: SLF001 - Call's own setup
        return call

    def _admit(
        self,
        admission: Admission,
        caller: str | None,
        now: float,
        timeout: float,
        stats: MethodStats | None,
    ) -> Permit | None:
        try:
            return admission.admit(self.method, caller, now, timeout)
        except ServiceError as refused:
            if stats is not None:
                reason = "rate_limit" if refused.code is Code.RESOURCE_EXHAUSTED else "shed"
                stats.refuse(reason, refused.code)
            raise

    def _new_stats(self, transport: Transport) -> MethodStats:
        """The metrics of this method over `transport`, on its first call."""
        assert self._metrics is not None  # noqa: S101 - only called with metrics on
        stats = self._stats[transport.name] = self._metrics.method(
            self.method, self.kind, transport.name
        )
        return stats

    def _trace(self, call: Call, traceparent: str | None, tracestate: str | None) -> None:
        """Open the call's SERVER span (current until it ends) and note its ids."""
        assert self.spans is not None  # noqa: S101 - only called with tracing on
        transport = call.transport
        span, token = self.spans.start(
            self._span_name,
            self._span_attributes.get(transport) or {"transport": transport},
            traceparent,
            tracestate,
        )
        call.span, call._span_token = span, token  # noqa: SLF001 - Call's own setup
        trace = call.trace = ids(span)
        if trace is not None:
            call.extra = {"trace_id": trace[0], "span_id": trace[1]}


# Most calls add no field to their log line: they share this empty one.
_NO_EXTRA: Mapping[str, object] = MappingProxyType({})


class Call(request_scope.Scope):
    """One request between `Endpoint.begin` and `Call.end`, and its request scope.

    A transport may set `code` for outcomes it produced itself (a handler that
    aborted with its own status) and add fields to the request's log line with
    `annotate`.
    """

    __slots__ = (
        "_alarm",
        "_endpoint",
        "_permit",
        "_shedder",
        "_span_token",
        "_started",
        "_stats",
        "_token",
        "_tracker",
        "code",
        "extra",
        "kind",
        "span",
        "timeout",
    )
    _token: Token[request_scope.Scope | None]

    def __init__(  # noqa: PLR0913 - built in one place, Endpoint.begin
        self,
        endpoint: Endpoint,
        kind: Transport,
        request_id: str,
        *,
        started: float,
        timeout: float,
        task: asyncio.Task[Any] | None,
        permit: Permit | None,
        stats: MethodStats | None,
    ) -> None:
        # The Scope's fields, set here rather than through Scope.__init__: one call less
        # on every request.
        self.deadline = started + timeout
        self.loop = endpoint.loop
        self.enforced_in = task
        self.request_id = request_id
        self.method = endpoint.method
        self.transport = kind.name
        self.trace: tuple[str, str] | None = None
        self.kind = kind
        self.timeout = timeout
        self.code = Code.OK
        self.extra: Mapping[str, object] = _NO_EXTRA
        self._tracker = endpoint.tracker
        self._started = started
        self._alarm: Alarm | None = None
        self._shedder = endpoint.shedder
        self._permit = permit
        self._stats = stats
        self._endpoint = endpoint
        # The request's SERVER span while tracing is on (transports may add attributes).
        self.span: Span | None = None
        self._span_token: object = None

    def annotate(self, key: str, value: object) -> None:
        """Add a field to the request's log line."""
        extra = dict(self.extra)
        extra[key] = value
        self.extra = extra

    def end(self, exc: BaseException | None) -> ServiceError | None:
        """Finish the call after the handler returned or raised `exc`; log its line.

        Returns the ServiceError the transport must answer with (a DeadlineExceeded
        when the chain's deadline expired, an `Internal`, logged with its traceback,
        for anything unexpected, or `exc` itself), or None when the transport lets
        `exc` (if any) propagate as it is: a CancelledError, an `answered` error.
        """
        alarm = self._alarm
        try:
            if exc is None and (alarm is None or not alarm.expired):
                return None  # the common case, without a call to _classify
            return self._classify(exc)
        finally:
            if alarm is not None:
                alarm.task = None  # disarmed
            task = self.enforced_in
            if task is not None:
                self.enforced_in = None
                self._tracker.discard(task)
            request_scope.current.reset(self._token)
            loop = self.loop
            ended = self._started if loop is None else loop.time()
            permit, shedder = self._permit, self._shedder
            if permit is not None and shedder is not None:
                shedder.release(permit, ended, outcome_of(self.code))
            stats = self._stats
            if stats is not None:
                stats.finished(self.code, ended - self._started)
            span = self.span
            if span is not None:
                end_span(span, self._span_token, self.code, exc)
            if (
                self._endpoint.log_ratio >= 1.0
                or self.code is not Code.OK
                or self._sampled_in(ended - self._started)
            ):
                logs.request(
                    log,
                    (
                        ended,
                        self._started,
                        self.method,
                        self.transport,
                        self.code,
                        self.request_id,
                        self.extra,
                    ),
                )

    def _sampled_in(self, duration: float) -> bool:
        """Whether the line of this successful call is written (LOG__SAMPLE_OK, LOG__SLOW)."""
        endpoint = self._endpoint
        return duration >= endpoint.slow or random.random() < endpoint.log_ratio  # noqa: S311

    def _classify(self, exc: BaseException | None) -> ServiceError | None:
        alarm = self._alarm
        if alarm is not None and alarm.expired:
            task = self.enforced_in
            if task is not None and task.cancelling():
                task.uncancel()
            self.code = Code.DEADLINE_EXCEEDED
            if exc is None or isinstance(exc, asyncio.CancelledError):
                return DeadlineExceeded("deadline exceeded")
        if exc is None:
            return None
        if isinstance(exc, ServiceError):
            self.code = exc.code
            return exc
        if isinstance(exc, asyncio.CancelledError):
            # The client went away or its own deadline passed (gRPC cancels the task).
            # The client's deadline passes before ours (ours counts from when the
            # call arrived), and its cancellation takes a moment to arrive: one that
            # comes within EXPIRY_SLACK (at most a tenth of the deadline) of ours is
            # the deadline expiring.
            loop = self.loop
            timeout = self.timeout
            slack = min(EXPIRY_SLACK, 0.1 * timeout)
            expired = loop is not None and loop.time() - self._started >= timeout - slack
            self.code = Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED
            return None
        if isinstance(exc, self.kind.answered) or not isinstance(exc, Exception):
            return None
        self.code = Code.INTERNAL
        log.error("unhandled error", exc_info=exc, extra={"method": self.method})
        error = Internal("internal error")
        error.__cause__ = exc
        return error
