"""gRPC adapter of the chain: wraps every method handler of the server.

A server interceptor cannot see the deadline (`HandlerCallDetails` has no
`time_remaining`), so it wraps the returned handler and reads the deadline from
the servicer context inside the wrapper, for all four arities and both streaming
styles (async generators and `context.write`). ServiceErrors become gRPC statuses
with google.rpc details (`grpc-status-details-bin`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from .chain import Call, Chain, Transport
from .errors import Code, DeadlineExceeded, InvalidArgument, ServiceError

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Enter: TypeAlias = Callable[[Context], AbstractAsyncContextManager[Call]]
    Parse: TypeAlias = Callable[[bytes], Any]

REQUEST_ID_HEADER = "x-request-id"

# A handler's own context.abort() already set the status; gRPC cancels the handler
# at the client's deadline itself.
GRPC = Transport("grpc", answered=(grpc.aio.AbortError,), enforces_deadline=True)

# Long-lived streams of infrastructure services: no request deadline, no log line.
_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# A downstream call that ran out of the deadline channels.py passed on means this
# request's time is up too. It fails a hop margin before the chain's own timeout, so
# left unmapped the caller would get INTERNAL instead of DEADLINE_EXCEEDED.
_DOWNSTREAM_EXPIRED = "deadline exceeded in a downstream call"


def status_of(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status a caller receives for `error`."""
    status = status_pb2.Status(code=int(error.code), message=error.message)
    if isinstance(error, InvalidArgument):
        detail = AnyProto()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.violations
                ]
            )
        )
        status.details.append(detail)
    return status


async def _abort(context: Context, error: ServiceError) -> None:
    status = status_of(error)
    await context.abort(
        grpc.StatusCode[error.code.name],
        status.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


class ChainInterceptor(grpc.aio.ServerInterceptor):
    """Runs every RPC (but health and reflection) through `Chain.call`."""

    def __init__(self, chain: Chain) -> None:
        self._chain = chain
        # Wrapped handlers by method: wrapping once per method, not per call, keeps
        # the hot path lean. Only registered methods get here, so it stays small.
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """The handler of this call, wrapped in the chain."""
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_EXEMPT):
            return handler
        wrapped = self._wrapped[method] = _wrap(handler, self._chain, method)
        return wrapped


def _request_id(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            return value[:128]
    return None


def _wrap(handler: Handler, chain: Chain, method: str) -> Handler:
    def enter(context: Context) -> AbstractAsyncContextManager[Call]:
        return chain.call(
            method,
            transport=GRPC,
            client_timeout=context.time_remaining(),
            request_id=_request_id(context),
        )

    # A single request message is parsed inside the chain (`_parse`), so a malformed
    # one is answered INVALID_ARGUMENT and logged like any bad request; left to grpc.aio,
    # it is UNKNOWN with the parser's exception text, and a traceback in the log.
    # Streamed requests stay with grpc.aio: handlers may read them with context.read(),
    # which would then return raw bytes.
    parse = handler.request_deserializer
    raw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    parsed = {"request_deserializer": parse, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary(enter, handler.unary_unary, parse), **raw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary(enter, handler.stream_unary, None), **parsed
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(enter, handler.unary_stream, parse), **raw
        )
    return grpc.stream_stream_rpc_method_handler(
        _streaming(enter, handler.stream_stream, None), **parsed
    )


def _parse(parse: Parse | None, request: Any) -> Any:
    """The request message, from its bytes when `parse` is given."""
    if parse is None:
        return request
    try:
        return parse(request)
    except DecodeError:
        raise InvalidArgument.field(
            "request", "not a valid message of this method's request type"
        ) from None


def _unary(
    enter: Enter, behavior: Any, parse: Parse | None
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handle(request_or_iterator: Any, context: Context) -> Any:
        try:
            async with enter(context) as call:
                try:
                    return await behavior(_parse(parse, request_or_iterator), context)
                except grpc.aio.AbortError:
                    call.code = _code(context)
                    raise
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise DeadlineExceeded(_DOWNSTREAM_EXPIRED) from error
                    raise
        except ServiceError as error:
            await _abort(context, error)

    return handle


def _streaming(
    enter: Enter, behavior: Any, parse: Parse | None
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    # Must itself be an async generator function: grpc.aio picks the streaming style
    # with inspect.isasyncgenfunction on the handler it is given.
    async def handle(request_or_iterator: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async with enter(context) as call:
                try:
                    result = behavior(_parse(parse, request_or_iterator), context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            yield response
                    else:  # a coroutine that writes with context.write()
                        await result
                except grpc.aio.AbortError:
                    call.code = _code(context)
                    raise
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise DeadlineExceeded(_DOWNSTREAM_EXPIRED) from error
                    raise
        except ServiceError as error:
            await _abort(context, error)

    return handle


def _code(context: Context) -> Code:
    code = context.code()
    return Code(code.value[0]) if isinstance(code, grpc.StatusCode) else Code.UNKNOWN
