"""OpenTelemetry traces: the tracer provider, the server span of a request, the flush at exit.

Tracing is on when an OTLP endpoint is configured the standard way
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, protocol
from `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: `http/protobuf`, the default, or
`grpc`) and `OTEL_SDK_DISABLED` is not `true`; the exporters read their other
`OTEL_EXPORTER_OTLP_*` variables (headers, timeout, compression) themselves, the
batch processor its `OTEL_BSP_*` ones. Sampling is parent-based: a request whose
caller sampled it (`traceparent` flags) is traced; one without a parent is traced
with probability `TRACING__SAMPLE_RATIO`.

A request that is not sampled gets no SDK span at all: `RequestSpans` decides first
and gives it a bare non-recording span that only carries the trace context on (so
the calls it makes say "not sampled" too). Through the SDK, that decision costs
some 40,000 instructions a request, about 4 % of a database-backed call, paid by
the nine requests in ten that are never recorded.

The server span is the request chain's (chain.py), not an interceptor's: gRPC and
the HTTP gateway share it, health checks and reflection never get one, and
`context.write()` streaming (health Watch) is untouched, which
opentelemetry-instrumentation-grpc's aio server interceptor breaks
(open-telemetry/opentelemetry-python-contrib#3066). Outbound gRPC calls use that
package's client interceptors (channels.py). PostgreSQL statements of sampled
requests get CLIENT spans from `QuerySpans` (db.py adds its logger to a connection
only while a sampled request holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from .errors import Code

log = logging.getLogger(__name__)

# Server-side status codes that mark a span as failed (OpenTelemetry's RPC
# conventions): the others are the caller's doing.
_SERVER_ERRORS = frozenset(
    {
        Code.UNKNOWN,
        Code.DEADLINE_EXCEEDED,
        Code.UNIMPLEMENTED,
        Code.INTERNAL,
        Code.UNAVAILABLE,
        Code.DATA_LOSS,
    }
)
_PROTOCOLS = ("http/protobuf", "grpc")
_propagator = TraceContextTextMapPropagator()


class TracingConfigError(ValueError):
    """The OTEL_* environment asks for something this service cannot do."""


def protocol(environ: Mapping[str, str]) -> str | None:
    """The OTLP protocol the environment configures traces to use; None: tracing off.

    Raises TracingConfigError for an exporter or protocol this service has not.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    kind = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind == "none":
        return None
    if kind != "otlp":
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={kind!r} is not supported: use otlp (or none)"
        )
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint:
        return None
    chosen = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if chosen not in _PROTOCOLS:
        variable = (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            if environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            else "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        raise TracingConfigError(
            f"{variable}={chosen!r} is not supported: use {' or '.join(_PROTOCOLS)}"
        )
    return chosen


def _exporter(chosen: str) -> SpanExporter:
    """The OTLP span exporter of `chosen` protocol; it reads its own OTEL_EXPORTER_OTLP_*."""
    # Imported when tracing is on: each pulls in its transport (requests, grpc).
    if chosen == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


class _Roots(Sampler):
    """Root spans: SERVER ones as `RequestSpans` decided, others by trace-id ratio.

    The request chain creates a root SERVER span through the SDK only once it decided
    to sample it; sampling it again here would trace ratio² of the requests.
    """

    def __init__(self, ratio: float) -> None:
        self._others = TraceIdRatioBased(ratio)
        self._sampled = SamplingResult(Decision.RECORD_AND_SAMPLE)

    def should_sample(  # noqa: PLR0913, PLR0917 - the Sampler interface
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        """Sample a request's SERVER span; the rest as TraceIdRatioBased would."""
        if kind is SpanKind.SERVER:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._others.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """How the sampler decides."""
        others = self._others.get_description()
        return f"RequestRoots(server: decided by the request chain, others: {others})"


_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_ID_BITS = 64
_TRACE_ID_BITS = 128


class RequestSpans:
    """Opens the SERVER span of each request for the request chain: its hot path.

    Sampled requests (the caller's `traceparent` says so, or a draw under `ratio` for
    a request that starts a trace) get an SDK span; the others a non-recording span
    that carries their trace id and "not sampled" to the calls they make.
    """

    __slots__ = ("_getrandbits", "_random", "_tracer", "ratio")

    def __init__(self, tracer: Tracer, ratio: float) -> None:
        self._tracer = tracer
        self.ratio = ratio
        self._random = random.random
        self._getrandbits = random.getrandbits

    def start(
        self,
        name: str,
        attributes: Mapping[str, str],
        traceparent: str | None,
        tracestate: str | None,
    ) -> tuple[Span, object]:
        """The span of a request, made current; returns it and the token for `end_span`.

        `traceparent`/`tracestate`: the caller's W3C trace context, if it sent one.
        """
        parent = None
        if traceparent:
            carrier = {"traceparent": traceparent}
            if tracestate:
                carrier["tracestate"] = tracestate
            parent = _propagator.extract(carrier)
            caller = trace.get_current_span(parent).get_span_context()
            if not caller.is_valid:
                parent = None  # a malformed traceparent: a new trace
            elif not caller.trace_flags.sampled:
                span: Span = NonRecordingSpan(
                    SpanContext(
                        caller.trace_id,
                        self._new_id(_ID_BITS),
                        is_remote=False,
                        trace_flags=_NOT_SAMPLED,
                        trace_state=caller.trace_state,
                    )
                )
                return span, otel_context.attach(trace.set_span_in_context(span, parent))
        if parent is None and self._random() >= self.ratio:
            span = NonRecordingSpan(
                SpanContext(
                    self._new_id(_TRACE_ID_BITS),
                    self._new_id(_ID_BITS),
                    is_remote=False,
                    trace_flags=_NOT_SAMPLED,
                )
            )
            return span, otel_context.attach(trace.set_span_in_context(span))
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def _new_id(self, bits: int) -> int:
        # 0 is the invalid id of W3C trace context.
        return self._getrandbits(bits) or 1


class Tracing:
    """The process's tracer provider and what the request chain needs of it.

    Build it with `configured` (from the environment) or, in tests, with any span
    processor. The provider is not made global: only this service's code traces,
    through `tracer`, so a library that registers its own provider cannot redirect
    or double the spans.
    """

    def __init__(
        self, processor: SpanProcessor, *, service: str, version: str, sample_ratio: float
    ) -> None:
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError("sample_ratio must be in [0, 1]")
        resource = Resource.create({"service.name": service, "service.version": version})
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the defaults above.
        resource = resource.merge(OTELResourceDetector().detect())
        self.provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(_Roots(sample_ratio)),
            shutdown_on_exit=False,  # `close` does it, bounded in time
        )
        self.provider.add_span_processor(processor)
        self.tracer: Tracer = self.provider.get_tracer(__package__ or "service")
        self.requests = RequestSpans(self.tracer, sample_ratio)

    @classmethod
    def configured(
        cls,
        *,
        service: str,
        version: str,
        sample_ratio: float,
        environ: Mapping[str, str] | None = None,
    ) -> Tracing | None:
        """Tracing as the OTEL_* environment configures it, None when it is off."""
        chosen = protocol(os.environ if environ is None else environ)
        if chosen is None:
            return None
        return cls(
            BatchSpanProcessor(_exporter(chosen)),
            service=service,
            version=version,
            sample_ratio=sample_ratio,
        )

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """opentelemetry-instrumentation-grpc's interceptors for an outbound channel."""
        # Imported when first needed: the package pulls in the instrumentation machinery.
        from opentelemetry.instrumentation.grpc import aio_client_interceptors  # noqa: PLC0415

        return list(aio_client_interceptors(tracer_provider=self.provider))  # type: ignore[no-untyped-call]

    async def close(self, timeout: float) -> bool:
        """Export the spans still queued and shut down, within `timeout` seconds.

        Runs in a daemon thread: an exporter that cannot reach its collector holds
        up neither the event loop nor the process's exit. Returns whether it
        finished in time.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                self.provider.force_flush(int(timeout * 1000))
                self.provider.shutdown()
            finally:
                # After a timeout the loop may be gone: nobody waits any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, done)

        threading.Thread(target=run, name="otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            log.warning("spans not exported before shutdown", extra={"timeout_s": timeout})
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def end_span(span: Span, token: object, code: Code, error: BaseException | None) -> None:
    """Finish a request's span with its status and leave its context."""
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", int(code))
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
            if error is not None and code is Code.INTERNAL:
                span.record_exception(error)
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


def ids(span: Span) -> tuple[str, str] | None:
    """The span's trace id and span id in hex (as W3C writes them), None if not sampled."""
    context = span.get_span_context()
    if not context.trace_flags.sampled:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (`traceparent`, `tracestate`) to outgoing headers."""
    _propagator.inject(headers)
    return headers


# A statement's literals, left out of db.query.text: quoted strings (with '' inside),
# dollar-quoted bodies, and numbers that are not part of a name or a $n parameter.
_LITERALS = re.compile(
    r"'(?:[^']|'')*'|\$\$.*?\$\$|(?<![\w$])\d+(?:\.\d+)?(?:e[+-]?\d+)?", re.DOTALL | re.IGNORECASE
)


def query_text(statement: str) -> str:
    """The statement as a span may carry it: literals replaced by `?`, whitespace squeezed."""
    return " ".join(_LITERALS.sub("?", statement).split())


def operation(statement: str) -> str:
    """The statement's first keyword, upper case (`SELECT`, `INSERT`, `WITH`...)."""
    first = statement.lstrip(" \t\r\n(").split(None, 1)
    return first[0].upper().rstrip(";") if first else ""


class LoggedQuery(Protocol):
    """What asyncpg's query log reports of a statement (`asyncpg.connection.LoggedQuery`)."""

    @property
    def query(self) -> str:
        """The statement."""

    @property
    def elapsed(self) -> float:
        """How long it took, in seconds."""

    @property
    def exception(self) -> BaseException | None:
        """Its error, if it failed."""

    @property
    def conn_addr(self) -> object:
        """The server: (host, port), or a Unix socket's path."""


class QuerySpans:
    """A CLIENT span for each PostgreSQL statement of a sampled request.

    Built from asyncpg's query log (`Connection.add_query_logger`), which calls its
    loggers after each statement with the statement, its duration and its error: a
    logger is added to a connection only while a sampled request holds it, so the
    others pay nothing (asyncpg checks for loggers with one truth test). The span is
    recorded after the fact, with the statement's start and end times.
    """

    __slots__ = ("_tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def logger(self) -> Callable[[LoggedQuery], None]:
        """A query logger whose spans are children of the current span."""
        parent = otel_context.get_current()
        tracer = self._tracer

        def record(query: LoggedQuery) -> None:
            end = time.time_ns()
            statement: str = query.query
            name = operation(statement) or "postgresql"
            attributes: dict[str, str | int] = {
                "db.system.name": "postgresql",
                "db.operation.name": name,
                "db.query.text": query_text(statement),
            }
            address = query.conn_addr
            if isinstance(address, tuple) and len(address) >= 2:  # noqa: PLR2004 - (host, port)
                attributes["server.address"] = str(address[0])
                attributes["server.port"] = int(address[1])
            elif isinstance(address, str):
                attributes["server.address"] = address  # a Unix socket
            span = tracer.start_span(
                name,
                context=parent,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=end - int(query.elapsed * 1e9),
            )
            error = query.exception
            if error is not None and not isinstance(error, asyncio.CancelledError):
                code = getattr(error, "sqlstate", None)
                if code:
                    span.set_attribute("db.response.status_code", str(code))
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
            span.end(end_time=end)

        return record
