"""gRPC adapter of the chain: every method handler is wrapped once, when it is registered.

Services register through a `Registrar` instead of the server itself, so each
method handler is wrapped in the chain (`Endpoint.begin` / `Call.end`) before grpc
sees it. A server interceptor would cost an extra coroutine per call and cannot see
the deadline anyway (`HandlerCallDetails` has no `time_remaining`). The wrapper
reads the deadline and request id from the servicer context, for all four arities
and both streaming styles (async generators and `context.write`); ServiceErrors
become gRPC statuses with google.rpc details (`grpc-status-details-bin`).

Methods whose request is a single message are served as request-streaming ones and
read that message themselves, under the chain's deadline: grpc.aio reads a unary
request before it calls the handler, with no bound but the client's own deadline,
so a call whose message never comes whole (no body, a truncated one) and that has
no `grpc-timeout` would hold its stream until the connection's maximum age.

Health and reflection skip the chain (long-lived streams, infrastructure, no
request deadline or log line) but get the same treatment of malformed requests:
INVALID_ARGUMENT, never UNKNOWN with the parser's exception text, and their single
request message is read within the default deadline too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from .chain import Call, Chain, Endpoint, Transport
from .errors import Code, DeadlineExceeded, InvalidArgument, ServiceError
from .logs import Throttle

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Parse: TypeAlias = Callable[[bytes], Any]

log = logging.getLogger(__name__)

# A status that could not be sent because its client had gone: one line per interval.
GONE_INTERVAL = 10.0
_gone_log = Throttle(interval=GONE_INTERVAL)

REQUEST_ID_HEADER = "x-request-id"
# Longest request id taken from a client; longer ones are cut.
REQUEST_ID_MAX = 128
TRACESTATE_MAX = 512

# A handler's own context.abort() already set the status; gRPC cancels the handler
# at the client's deadline itself.
GRPC = Transport("grpc", answered=(grpc.aio.AbortError,), enforces_deadline=True)

# Long-lived streams of infrastructure services: no request deadline, no log line.
EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# A downstream call that ran out of the deadline channels.py passed on means this
# request's time is up too. It fails a hop margin before the chain's own deadline,
# so left unmapped the caller would get INTERNAL instead of DEADLINE_EXCEEDED.
_DOWNSTREAM_EXPIRED = "deadline exceeded in a downstream call"
_MALFORMED = "not a valid message of this method's request type"
_DOWNSTREAM_UNAVAILABLE = "a service this one depends on is unavailable"
_MISSING = "no request message: the client ended its stream without one"
_EOF = grpc.aio.EOF


# Bounds on what a status carries, in UTF-8 bytes: messages and violations may quote
# the request (an unknown field path, say), and gRPC trailers are limited (8 KiB by
# default: past it the client gets RESOURCE_EXHAUSTED "Stream removed" instead of the
# status). With these, grpc-message (percent-encoded) and grpc-status-details-bin
# (base64) stay under 8 KiB together.
MESSAGE_MAX = 400
FIELD_MAX = 100
DESCRIPTION_MAX = 200
VIOLATIONS_MAX = 12


def cut(text: str, limit: int) -> str:
    """`text`, or as much of it as fits in `limit` UTF-8 bytes followed by an ellipsis."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "\u2026"


def status_of(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status a caller receives for `error`, its texts bounded."""
    status = status_pb2.Status(code=int(error.code), message=cut(error.message, MESSAGE_MAX))
    if isinstance(error, InvalidArgument):
        detail = AnyProto()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=cut(v.field, FIELD_MAX),
                        description=cut(v.description, DESCRIPTION_MAX),
                    )
                    for v in error.violations[:VIOLATIONS_MAX]
                ]
            )
        )
        status.details.append(detail)
    if error.retry_after is not None:
        delay = Duration()
        delay.FromNanoseconds(round(error.retry_after * 1e9))
        detail = AnyProto()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    return status


# Statuses of errors without field violations, serialized once: the refusals of rate
# limits and load shedding come by the thousand under overload, each as costly to
# answer as the rest of its refusal. Bounded: cleared when full.
_STATUS_CACHE: dict[tuple[Code, str, float | None], bytes] = {}
_STATUS_CACHE_SIZE = 256


def _details_bin(error: ServiceError) -> bytes:
    if isinstance(error, InvalidArgument):
        return status_of(error).SerializeToString()
    retry_after = None if error.retry_after is None else round(error.retry_after, 3)
    key = (error.code, error.message, retry_after)
    cached = _STATUS_CACHE.get(key)
    if cached is None:
        if len(_STATUS_CACHE) >= _STATUS_CACHE_SIZE:
            _STATUS_CACHE.clear()
        cached = _STATUS_CACHE[key] = status_of(error).SerializeToString()
    return cached


async def abort(context: Context, error: ServiceError) -> None:
    """End the call with `error`'s status and details; raises grpc.aio.AbortError.

    With a retry delay, also `grpc-retry-pushback-ms`: gRPC clients whose retry
    policy retries the code wait that long before they do.
    """
    details = ("grpc-status-details-bin", _details_bin(error))
    if error.retry_after is None:
        trailers: tuple[tuple[str, str | bytes], ...] = (details,)
    else:
        trailers = (
            details,
            ("grpc-retry-pushback-ms", str(max(round(error.retry_after * 1000), 0))),
        )
    try:
        await context.abort(
            _GRPC_CODES[error.code], cut(error.message, MESSAGE_MAX), trailing_metadata=trailers
        )
    except grpc.aio.InternalError as failed:
        # grpc core refused to send the status (ExecuteBatchError): the client went away
        # (cancelled, its deadline passed, its connection closed) before it, as under
        # overload a refusal sent late does. Expected, not a fault of the service: no
        # traceback, one line per interval with a count, and the call ends as cancelled.
        if not (context.done() or context.cancelled()):
            raise
        held = _gone_log.allow("gone")
        if held is not None:
            log.info(
                "status not sent: the client had gone",
                extra={"code": error.code.name, "error": type(failed).__name__, "suppressed": held},
            )
        raise asyncio.CancelledError from None


_GRPC_CODES = {Code(code.value[0]): code for code in grpc.StatusCode}


class Registrar(grpc.aio.Server):
    """What services register with instead of the server: wraps each handler first.

    `add_XServicer_to_server(servicer, registrar)` (generated code) calls the two
    `add_*_handlers` methods; the rest is the server's. `handlers` keeps every
    registered method's own, unwrapped handler by full method name, for the HTTP
    gateway, which runs the same servicer through the same chain.
    """

    def __init__(self, server: grpc.aio.Server, chain: Chain) -> None:
        self._server = server
        self._chain = chain
        self.handlers: dict[str, Handler] = {}
        self._wrapped: dict[str, Handler] = {}
        server.add_generic_rpc_handlers((_Dispatch(self._wrapped),))

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        """Register a service's handlers, each wrapped in the chain."""
        for name, handler in method_handlers.items():
            method = f"/{service_name}/{name}"
            self.handlers[method] = handler
            self._wrapped[method] = wrap(handler, method, self._chain)

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        """Register generic handlers; what they return is wrapped in the chain."""
        self._server.add_generic_rpc_handlers(
            tuple(_Generic(handler, self._chain) for handler in generic_rpc_handlers)
        )

    def add_insecure_port(self, address: str) -> int:
        """The server's."""
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """The server's."""
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        """The server's."""
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        """The server's."""
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """The server's."""
        return await self._server.wait_for_termination(timeout)


class _Dispatch(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, Handler]) -> None:
        self._get = handlers.get

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._get(handler_call_details.method)


class _Generic(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped, once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler, chain: Chain) -> None:
        self._inner = inner
        self._chain = chain
        self._wrapped: dict[str, Handler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = self._inner.service(handler_call_details)
        wrapped = None if handler is None else wrap(handler, method, self._chain)
        # Generated services answer for their own methods only, so this stays small.
        self._wrapped[method] = wrapped
        return wrapped


def _request_id(metadata: Any) -> str | None:
    """The x-request-id the client sent (`invocation_metadata()`), cut to a sane length."""
    return _value(metadata, REQUEST_ID_HEADER)


def _value(metadata: Any, name: str, limit: int = REQUEST_ID_MAX) -> str | None:
    for key, value in metadata or ():
        if key == name and isinstance(value, str):
            return value[:limit]
    return None


def _guarded(parse: Parse | None) -> Parse | None:
    """`parse`, raising InvalidArgument for bytes that are not a valid message."""
    if parse is None:
        return None

    def guarded(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            raise InvalidArgument.field("request", _MALFORMED) from None

    return guarded


def wrap(handler: Handler, method: str, chain: Chain) -> Handler:
    """`handler` running through the chain as `method` (exempt methods: parsing only)."""
    # Request messages are parsed inside the wrapper, so a malformed one is answered
    # INVALID_ARGUMENT and logged like any bad request; left to grpc.aio, it is
    # UNKNOWN with the parser's exception text and a traceback in the log. A single
    # request message is also read here (see the module docstring), so its wait is
    # bounded from the moment the call starts. Streamed requests are parsed by
    # grpc.aio as handlers read them, through a parser that raises InvalidArgument.
    parse = _guarded(handler.request_deserializer)
    serialize = handler.response_serializer
    endpoint = None if method.startswith(EXEMPT) else chain.endpoint(method, _kind(handler))
    read_within = min(chain.settings.default, chain.settings.maximum)
    if handler.unary_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(endpoint, handler.unary_unary, parse, single=True, read_within=read_within),
            None,
            serialize,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(endpoint, handler.stream_unary, None, single=False, read_within=read_within),
            parse,
            serialize,
        )
    if handler.unary_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(endpoint, handler.unary_stream, parse, single=True, read_within=read_within),
            None,
            serialize,
        )
    return grpc.stream_stream_rpc_method_handler(
        _streaming(endpoint, handler.stream_stream, None, single=False, read_within=read_within),
        parse,
        serialize,
    )


def _kind(handler: Handler) -> str:
    """The handler's arity as the metrics' grpc_type names it."""
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _beginner(endpoint: Endpoint) -> Callable[[Context], Call]:
    """`endpoint.begin` for a gRPC call: what it needs, read from the call's metadata."""
    begin = endpoint.begin
    admission = endpoint.admission
    caller_header = "" if admission is None else admission.caller_header
    if endpoint.spans is None:
        if not caller_header:
            return lambda context: begin(
                GRPC, context.time_remaining(), _request_id(context.invocation_metadata())
            )

        def with_caller(context: Context) -> Call:
            metadata = context.invocation_metadata()
            caller = _value(metadata, caller_header)
            return begin(GRPC, context.time_remaining(), _request_id(metadata), caller=caller)

        return with_caller

    def traced(context: Context) -> Call:
        metadata = context.invocation_metadata()
        caller = _value(metadata, caller_header) if caller_header else None
        return begin(
            GRPC,
            context.time_remaining(),
            _request_id(metadata),
            caller=caller,
            traceparent=_value(metadata, "traceparent"),
            # W3C: 32 entries at most, which propagators may cut at 512 characters.
            tracestate=_value(metadata, "tracestate", TRACESTATE_MAX),
        )

    return traced


def _translate(exc: BaseException) -> BaseException:
    """The exception the chain classifies for what the handler raised."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(_DOWNSTREAM_EXPIRED)
    return exc


def _aborted_code(context: Context) -> Code:
    code = context.code()
    return Code(code.value[0]) if isinstance(code, grpc.StatusCode) else Code.UNKNOWN


def _unary(
    endpoint: Endpoint | None,
    behavior: Any,
    parse: Parse | None,
    *,
    single: bool,
    read_within: float,
) -> Callable[[Any, Context], Awaitable[Any]]:
    if endpoint is None:
        return _exempt_unary(behavior, parse, single=single, read_within=read_within)
    begin = _beginner(endpoint)

    async def handle(request: Any, context: Context) -> Any:
        try:
            call = begin(context)
        except ServiceError as refused:  # rate limited or shed: nothing started
            await abort(context, refused)
        try:
            if single:
                request = await _read_single(context, parse)
            response = await behavior(request, context)
        except grpc.aio.AbortError as exc:
            call.code = _aborted_code(context)
            call.end(exc)
            raise
        except BaseException as exc:  # classified by the chain; re-raised unless it says otherwise
            error = call.end(_translate(exc))
            if error is None:
                raise
            await abort(context, error)
        error = call.end(None)
        if error is not None:  # the deadline passed while the handler held on
            await abort(context, error)
        return response

    return handle


def _streaming(  # noqa: C901 - one flat wrapper: a helper would add a frame per message
    endpoint: Endpoint | None,
    behavior: Any,
    parse: Parse | None,
    *,
    single: bool,
    read_within: float,
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    if endpoint is None:
        return _exempt_streaming(behavior, parse, single=single, read_within=read_within)
    begin = _beginner(endpoint)

    # Must itself be an async generator function: grpc.aio picks the streaming style
    # with inspect.isasyncgenfunction on the handler it is given.
    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            call = begin(context)
        except ServiceError as refused:
            await abort(context, refused)
        try:
            if single:
                request = await _read_single(context, parse)
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a coroutine that writes with context.write()
                await result
        except grpc.aio.AbortError as exc:
            call.code = _aborted_code(context)
            call.end(exc)
            raise
        except BaseException as exc:  # classified by the chain; re-raised unless it says otherwise
            error = call.end(_translate(exc))
            if error is None:
                raise
            await abort(context, error)
        error = call.end(None)
        if error is not None:
            await abort(context, error)

    return handle


async def _read_single(context: Context, parse: Parse | None) -> Any:
    """The one request message of a call, parsed; InvalidArgument when none came."""
    raw = await context.read()
    if raw is _EOF:
        raise InvalidArgument.field("request", _MISSING)
    return raw if parse is None else parse(raw)


async def _read_single_within(context: Context, parse: Parse | None, within: float) -> Any:
    """`_read_single` for calls no deadline of the chain bounds: DeadlineExceeded after `within`."""
    try:
        async with asyncio.timeout(within):
            return await _read_single(context, parse)
    except TimeoutError:
        raise DeadlineExceeded("no request message within the default deadline") from None


def _exempt_unary(
    behavior: Any, parse: Parse | None, *, single: bool, read_within: float
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handle(request: Any, context: Context) -> Any:
        try:
            if single:
                request = await _read_single_within(context, parse, read_within)
            return await behavior(request, context)
        except (InvalidArgument, DeadlineExceeded) as error:
            await abort(context, error)

    return handle


def _exempt_streaming(
    behavior: Any, parse: Parse | None, *, single: bool, read_within: float
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            if single:
                request = await _read_single_within(context, parse, read_within)
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:
                await result
        except (InvalidArgument, DeadlineExceeded) as error:
            await abort(context, error)

    return handle
