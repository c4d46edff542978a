"""The gateway's ASGI app: HTTP requests through the same chain and servicers as gRPC.

Each routed request runs the method's own servicer function (the unwrapped grpc
handler the server registered) between `Endpoint.begin` and `Call.end`, exactly
as handlers.py does for gRPC, so deadlines, the request scope, classification,
the log line (and whatever joins the chain later) are the same; only the
transport is `http`. The deadline comes from the `grpc-timeout` header, the
request id from `x-request-id` (echoed in the response), metadata from
allow-listed headers and `grpc-metadata-*` headers.

Everything after the route is matched (reading and parsing the body, building
the request message, encoding the response) happens inside the call, so every
answered request of a method has its log line, and the deadline bounds a slow
upload too. Requests that match no route (404, 405) have no method and no line.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from ..chain import Chain, Transport
from ..errors import Code, InvalidArgument, ServiceError
from ..handlers import status_of
from ..httpserver import Receive, Scope, Send
from . import replies
from .context import Aborted, HttpContext
from .exchange import Exchange, Head, reply, status_reply
from .routes import Match, MethodNotAllowed, Route, RouteError, Router
from .transcode import Transcoder, declared_length, json_content_type

log = logging.getLogger(__name__)

# A servicer's context.abort() already decided the reply; the chain arms its own
# deadline alarm (nothing else cancels an HTTP handler at the deadline).
HTTP = Transport("http", answered=(Aborted,))

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
Builtin = Callable[[str, Send], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """What a request may bring: body size, and which headers become metadata."""

    max_body_bytes: int
    metadata_headers: frozenset[str] = frozenset({"authorization", "x-request-id"})


@dataclass(frozen=True, slots=True)
class _Method:
    """A route resolved at startup: its chain endpoint and servicer function."""

    route: Route
    begin: Callable[..., Any]
    behavior: Callable[..., Any]


class Gateway:
    """The ASGI app of the gateway's routes, and of `builtins` paths (GET and HEAD)."""

    def __init__(
        self,
        router: Router,
        handlers: Mapping[str, Handler],
        chain: Chain,
        *,
        limits: Limits,
        builtins: Mapping[str, Builtin] | None = None,
    ) -> None:
        """Resolve every route's servicer function and chain endpoint.

        Raises RouteError when a route's method has no registered handler, or a
        route would hide one of `builtins`.
        """
        self._router = router
        self._transcoder = Transcoder(router.routes)
        self._limit = limits.max_body_bytes
        self._allowed = frozenset(name.lower().encode() for name in limits.metadata_headers)
        self._builtins = dict(builtins or {})
        endpoints = {
            route.method: chain.endpoint(
                route.method, "server_stream" if route.streaming else "unary"
            )
            for route in router.routes
        }
        admission = chain.admission
        self._caller = (admission.caller_header if admission is not None else "").encode()
        self._methods: dict[Route, _Method] = {}
        problems = []
        for route in router.routes:
            handler = handlers.get(route.method)
            behavior = None
            if handler is not None:
                behavior = handler.unary_stream if route.streaming else handler.unary_unary
            if behavior is None:
                problems.append(f"{route.method} ({route.rule}) has no servicer registered")
            else:
                self._methods[route] = _Method(route, endpoints[route.method].begin, behavior)
        problems += [
            f"a route hides the gateway's own GET {path}"
            for path in self._builtins
            if isinstance(router.match("GET", path), Match)
        ]
        if problems:
            raise RouteError("\n".join(problems))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request."""
        if scope["type"] != "http":
            return
        try:
            await self._dispatch(scope, receive, send)
        except Exception:
            # A bug of the gateway itself (the chain handles the servicers' own):
            # the details go to the log, the client gets a generic INTERNAL.
            log.exception("gateway error", extra={"path": scope.get("path")})
            await reply(send, status_reply(Code.INTERNAL, "internal error"))

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        try:
            path = scope["raw_path"].decode()
            found = self._router.match(method, path)
        except UnicodeDecodeError:
            await reply(send, status_of(InvalidArgument.field("path", "not UTF-8")))
            return
        except InvalidArgument as exc:
            await reply(send, status_of(exc))
            return
        if isinstance(found, Match):
            await self._call(self._methods[found.route], found, scope, receive, send)
            return
        builtin = self._builtins.get(path)
        if builtin is not None:
            if method in {"GET", "HEAD"}:
                await builtin(method, send)
                return
            allow: tuple[str, ...] = ("GET", "HEAD")
        elif isinstance(found, MethodNotAllowed):
            allow = found.allow
        else:
            await reply(send, status_reply(Code.NOT_FOUND, f"no route for {method} {path}"), 404)
            return
        message = f"{method} is not allowed on {path}; allowed: {', '.join(allow)}"
        allowed = [(b"allow", ", ".join(allow).encode())]
        await reply(send, status_reply(Code.UNIMPLEMENTED, message), 405, allowed)

    async def _call(
        self, method: _Method, match: Match, scope: Scope, receive: Receive, send: Send
    ) -> None:
        head = Head.read(scope["headers"], self._allowed, self._caller)
        context = HttpContext(tuple(head.metadata), scope.get("client"))
        try:
            call = method.begin(
                HTTP,
                head.timeout,
                head.request_id,
                caller=head.caller,
                traceparent=head.traceparent,
                tracestate=head.tracestate,
            )
        except ServiceError as refused:  # the chain refused the call before it started
            await reply(send, status_of(refused), replies.http_status(refused))
            return
        span = call.span
        if span is not None and span.is_recording():
            # The route's template, never the path: ids stay out of span attributes.
            span.set_attributes(
                {"http.request.method": scope["method"], "http.route": method.route.rule}
            )
        exchange = Exchange(send, call, context)
        if head.problem is not None:
            await exchange.failed(head.problem)
            return
        route = method.route
        try:
            body = b""
            if head.chunked or head.length is not None:
                body = await self._body(route, receive, head)
            query = scope["query_string"]
            request = self._transcoder.request(match, query.decode() if query else "", body)
            if route.streaming:
                payload = b""
            else:
                response = await method.behavior(request, context)
                payload = b"" if context.status else self._transcoder.response(route, response)
        except BaseException as exc:  # noqa: BLE001 - classified by the chain, which says what to re-raise
            await exchange.failed(exc)
            return
        if route.streaming:
            await self._stream(method, request, exchange, receive)
        else:
            await exchange.succeeded(payload)

    async def _body(self, route: Route, receive: Receive, head: Head) -> bytes:
        """The request body, refused (413) past the limit before it is read or parsed."""
        limit = self._limit
        too_large = f"the request body is over the limit of {limit} bytes"
        declared = declared_length(head.length)
        if declared is not None and declared > limit:
            raise replies.BodyTooLarge(too_large)
        if declared == 0 and not head.chunked:
            return b""
        if route.body is not None and not json_content_type(head.content_type):
            description = f"must be application/json (got {head.content_type!r})"
            raise replies.UnsupportedMediaType.field("Content-Type", description)
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise replies.ClientGone("the client closed the connection")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise replies.BodyTooLarge(too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _stream(
        self, method: _Method, request: Any, exchange: Exchange, receive: Receive
    ) -> None:
        """Run a server-streaming call, writing each message as a line of JSON."""
        route, item = method.route, self._transcoder.stream_item

        async def write(message: Any) -> None:
            await exchange.line(item(route, message))

        exchange.context.writer = write
        # A client that goes away ends the stream: nothing else would notice before
        # the deadline, since uvicorn drops writes to a closed connection.
        task = asyncio.current_task()
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch(receive, task, gone))
        try:
            result = method.behavior(request, exchange.context)
            if inspect.isasyncgen(result):
                async for message in result:
                    await write(message)
            else:  # a coroutine that writes with context.write()
                await result
        except asyncio.CancelledError as exc:
            if gone.is_set() and task is not None:
                # The watcher cancelled the task: the client is gone, nobody to answer.
                task.uncancel()
                exchange.gone()
            else:
                await exchange.failed(exc)
        except BaseException as exc:  # noqa: BLE001 - classified by the chain, which says what to re-raise
            await exchange.failed(exc)
        else:
            await exchange.streamed()
        finally:
            watcher.cancel()


async def _watch(receive: Receive, task: asyncio.Task[Any] | None, gone: asyncio.Event) -> None:
    """Cancel `task` when the client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    if task is not None:
        task.cancel()
