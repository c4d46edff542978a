"""One HTTP exchange of a routed call: its request head, and the replies it can send.

`Head` is what the gateway reads from the request headers in one pass. `Exchange`
ends the call (`Call.end`, exactly once) and answers: a response message, a
google.rpc.Status, or a stream of JSON lines.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import grpc
import orjson
from google.rpc import status_pb2

from ..chain import Call
from ..deadlines import parse_grpc_timeout
from ..errors import HTTP_STATUS, Code, DeadlineExceeded, InvalidArgument, ServiceError
from ..handlers import status_of
from ..httpserver import Send
from . import replies
from .context import INITIAL_PREFIX, Aborted, HttpContext, metadata_value

REQUEST_ID_HEADER = b"x-request-id"
NDJSON = b"application/x-ndjson"
_METADATA_PREFIX = INITIAL_PREFIX.encode()
# A request id we echo and log: 1 to 128 visible ASCII characters, no spaces.
_SANE_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_DOWNSTREAM_EXPIRED = "deadline exceeded in a downstream call"
# As in handlers.py: W3C lets propagators cut tracestate at 512 characters, and a
# caller's name is cut like a request id.
_TRACESTATE_MAX = 512
_CALLER_MAX = 128

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Head:
    """What the request headers say about the call.

    `problem` is the first header the call must be refused for (a malformed
    `grpc-timeout`, a `-bin` metadata value that is not base64).
    """

    timeout: float | None = None
    request_id: str | None = None
    caller: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    content_type: str | None = None
    length: str | None = None
    chunked: bool = False
    metadata: list[tuple[str, str | bytes]] = field(default_factory=list)
    problem: ServiceError | None = None

    @classmethod
    def read(
        cls, headers: list[tuple[bytes, bytes]], allowed: frozenset[bytes], caller: bytes = b""
    ) -> Head:
        """One pass over the headers; names arrive in lowercase (ASGI).

        `caller`: the header naming the caller for per-caller rate limits (b"": none).
        """
        head = cls()
        for name, value in headers:
            if name == b"grpc-timeout":
                try:
                    head.timeout = parse_grpc_timeout(value.decode("latin-1"))
                except ValueError as exc:
                    head.problem = head.problem or InvalidArgument.field("grpc-timeout", str(exc))
            elif name == REQUEST_ID_HEADER:
                if _SANE_ID.fullmatch(value):
                    head.request_id = value.decode()
            elif name == b"content-type":
                head.content_type = value.decode("latin-1")
            elif name == b"content-length":
                head.length = value.decode("latin-1")
            elif name == b"transfer-encoding":
                head.chunked = True
            elif name == b"traceparent":
                head.traceparent = value.decode("latin-1")
            elif name == b"tracestate":
                head.tracestate = value[:_TRACESTATE_MAX].decode("latin-1")
            elif caller and name == caller:
                head.caller = value[:_CALLER_MAX].decode("latin-1")
            if name in allowed or name.startswith(_METADATA_PREFIX):
                head.metadatum(name, value)
        return head

    def metadatum(self, name: bytes, value: bytes) -> None:
        """Add a header as metadata (`grpc-metadata-` dropped from its name)."""
        key = name.decode("latin-1").removeprefix(INITIAL_PREFIX)
        try:
            self.metadata.append((key, metadata_value(key, value)))
        except ValueError as exc:
            self.problem = self.problem or InvalidArgument.field(name.decode("latin-1"), str(exc))


def translate(exc: BaseException) -> BaseException:
    """The exception the chain classifies for what the handler raised."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(_DOWNSTREAM_EXPIRED)
    return exc


async def reply(
    send: Send,
    result: status_pb2.Status,
    http: int | None = None,
    headers: Headers | None = None,
) -> None:
    """Answer with `result` as JSON, under `http` (else the HTTP status of its code)."""
    payload = replies.body(result)
    found = replies.headers(payload, result)
    if headers:
        found += headers
    status = http if http is not None else HTTP_STATUS[Code(result.code)]
    if status == replies.BodyTooLarge.http_status:
        # The rest of the body is not read: the connection cannot serve another request.
        found.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": found})
    await send({"type": "http.response.body", "body": payload})


class Exchange:
    """The call of one request and how to answer it; ends the call exactly once."""

    __slots__ = ("call", "context", "send", "started")

    def __init__(self, send: Send, call: Call, context: HttpContext) -> None:
        self.send = send
        self.call = call
        self.context = context
        self.started = False

    def _headers(self) -> Headers:
        return [
            (REQUEST_ID_HEADER, self.call.request_id.encode()),
            *self.context.response_headers(),
        ]

    async def failed(self, exc: BaseException) -> None:
        """End the call with what the handler raised and answer; re-raises what the chain says."""
        call, context = self.call, self.context
        if isinstance(exc, Aborted):
            call.code = exc.code
            call.end(exc)
            context.finish(cancelled=False)
            await self.status(replies.status(exc.code, exc.message, exc.details))
            return
        error = call.end(translate(exc))
        context.finish(cancelled=isinstance(exc, asyncio.CancelledError))
        if error is None and isinstance(exc, asyncio.CancelledError):
            # Not the deadline (the chain would say so) and not the client (an HTTP
            # handler is not cancelled when it leaves): the server is stopping and
            # the grace is over. Answer for it; the task ends right after.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self.status(status_reply(Code.UNAVAILABLE, "the server is shutting down"))
            return
        if error is None:
            raise exc
        await self.status(status_of(error), replies.http_status(error))

    async def succeeded(self, payload: bytes) -> None:
        """End the call after the handler returned; answer `payload` (or its set status)."""
        call, context = self.call, self.context
        outcome = context.status
        if outcome is not None:
            # The servicer set a code and returned: that status is the answer.
            call.code = outcome[0]
        late = call.end(None)
        context.finish(cancelled=late is not None)
        if late is not None:  # the deadline passed while the handler held on
            await self.status(status_of(late), replies.http_status(late))
        elif outcome is not None:
            await self.status(replies.status(*outcome))
        else:
            headers = [
                (b"content-type", replies.JSON),
                (b"content-length", b"%d" % len(payload)),
                *self._headers(),
            ]
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            await self.send({"type": "http.response.body", "body": payload})

    async def status(self, result: status_pb2.Status, http: int | None = None) -> None:
        """Answer with a status; mid-stream, as the stream's last line."""
        if self.started:
            # Headers went out with 200: an error mid-stream is the last line.
            line = orjson.dumps({"error": orjson.loads(replies.body(result))}) + b"\n"
            await self.send({"type": "http.response.body", "body": line, "more_body": False})
        else:
            await reply(self.send, result, http, self._headers())

    async def line(self, line: bytes) -> None:
        """Send one line of a server stream (the headers first, with the first line)."""
        if not self.started:
            self.started = True
            headers = [(b"content-type", NDJSON), *self._headers()]
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.send({"type": "http.response.body", "body": line, "more_body": True})

    async def streamed(self) -> None:
        """End a server stream whose handler returned."""
        late = self.call.end(None)
        self.context.finish(cancelled=late is not None)
        if late is not None:
            await self.status(status_of(late), replies.http_status(late))
            return
        if not self.started:
            await self.line(b"")
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    def gone(self) -> None:
        """End a stream whose client went away: nobody to answer."""
        self.call.end(replies.ClientGone("the client closed the connection"))
        self.context.finish(cancelled=True)


def status_reply(code: Code, message: str) -> status_pb2.Status:
    """A bare status (no details)."""
    return status_pb2.Status(code=int(code), message=message)
