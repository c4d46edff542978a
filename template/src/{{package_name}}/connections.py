"""Accepting HTTP connections without starving the loop, and bounding what each may hold.

`Listener` accepts connections on a listening socket and hands each to uvicorn's
httptools protocol. It replaces asyncio's own accept loop, which on EMFILE or
ENFILE logs an ERROR with a traceback for every pending connection on every turn
of the loop and schedules a retry for each: when descriptors run out it writes
tens of thousands of lines a second and other requests wait. Here running out of
descriptors pauses accepting (backing off up to a second) and logs one line a
second at most; at `max_connections` open connections accepting pauses until one
closes, so the descriptors a listener can take are bounded.

`_Protocol` adds to uvicorn's what it lacks: a bound on the request head (431
past `max_header_bytes`), a time limit to send it, and no log line per malformed
request (one line per interval, with a count). Its transport (`CoalescingTransport`) sends
a response's head and the body that follows in one write: uvicorn writes them
separately, and with TCP_NODELAY each write is a system call and a packet of its
own (a fifth of a small JSON response's cost in the server).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .logs import Throttle

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

# Out of descriptors or kernel memory: accepting again at once would fail again.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Connections accepted per readiness event before other callbacks get a turn.
ACCEPT_BATCH = 64
FIRST_BACKOFF = 0.05
MAX_BACKOFF = 1.0
# Exhausted descriptors and malformed requests are logged at most this often.
LOG_INTERVAL = 1.0
BAD_REQUEST = 400
HEAD_TOO_LARGE = 431


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard one; returns (soft, hard) after.

    Every connection, pooled database connection and log pipe is a descriptor, and
    the soft limit is often 1024 where the hard one is far higher. Raising it is
    allowed without privileges. An unlimited hard limit leaves the soft one alone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard not in (resource.RLIM_INFINITY, soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft, hard


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds per listener: open connections, and the size of a request head."""

    max_connections: int = 1024
    max_header_bytes: int = 16384


class Listener:
    """Accepts connections on `sock` for a started uvicorn server, within the limits."""

    def __init__(
        self,
        sock: socket.socket,
        server: uvicorn.Server,
        *,
        name: str,
        limits: ConnectionLimits,
        head_timeout: float,
    ) -> None:
        self.name = name
        self.limits = limits
        self.head_timeout = head_timeout
        self.connections: set[_Protocol] = set()
        self._sock = sock
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._stopped = False
        self._backoff = FIRST_BACKOFF
        self._retry: asyncio.TimerHandle | None = None
        self.throttle = Throttle(LOG_INTERVAL)
        self._pending: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start accepting (once uvicorn's server has started)."""
        self._resume()
        self._sweep()

    def stop(self) -> None:
        """Stop accepting, close the listening socket and idle connections.

        A connection with a request in flight stays until its response, which says
        `Connection: close`. (uvicorn does the same once its server notices it
        should exit, up to 0.1 s later; meanwhile a keep-alive client could still
        start another request.)
        """
        self._stopped = True
        self._pause()
        for handle in (self._retry, self._sweeper):
            if handle is not None:
                handle.cancel()
        self._sock.close()
        for protocol in list(self.connections):
            protocol.shutdown()

    def opened(self, protocol: _Protocol) -> None:
        """A connection was made; accepting pauses at the limit."""
        self.connections.add(protocol)
        if len(self.connections) >= self.limits.max_connections:
            self._pause()

    def closed(self, protocol: _Protocol) -> None:
        """A connection was lost; accepting resumes below the limit."""
        self.connections.discard(protocol)
        self._below_limit()

    def _below_limit(self) -> None:
        # Not while backing off: the retry timer resumes then.
        if self._retry is None and len(self.connections) < self.limits.max_connections:
            self._resume()

    def _resume(self) -> None:
        self._retry = None
        if not self._reading and not self._stopped:
            self._reading = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._sock.fileno())

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.connections) + len(self._pending) >= self.limits.max_connections:
                self._pause()
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                self._back_off(exc)
                return
            self._backoff = FIRST_BACKOFF
            conn.setblocking(False)  # noqa: FBT003 - socket API
            task = self._loop.create_task(self._serve(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, conn)
        except OSError:
            conn.close()  # reset before its transport was made: nothing to serve
            self._below_limit()

    def _protocol(self) -> _Protocol:
        server = self._server
        return _Protocol(
            config=server.config,
            server_state=server.server_state,
            app_state=server.lifespan.state,
            _loop=self._loop,
            listener=self,
        )

    def _back_off(self, exc: OSError) -> None:
        """Stop accepting for a while; retry later, doubling the wait up to a second."""
        self._pause()
        delay = self._backoff
        self._backoff = min(delay * 2, MAX_BACKOFF)
        self._retry = self._loop.call_later(delay, self._resume)
        exhausted = exc.errno in _EXHAUSTED
        held = self.throttle.allow("exhausted" if exhausted else "accept")
        if held is not None:
            log.warning(
                "not accepting connections for a while: out of file descriptors"
                if exhausted
                else "accepting a connection failed",
                extra={
                    "server": self.name,
                    "error": errno.errorcode.get(exc.errno or 0, str(exc)),
                    "retry_in_s": delay,
                    "open_connections": len(self.connections),
                    "suppressed": held,
                },
            )

    def _sweep(self) -> None:
        """Close connections that took longer than `head_timeout` to send a request head."""
        now = self._loop.time()
        for protocol in list(self.connections):
            since = protocol.head_since
            if since is not None and now - since > self.head_timeout:
                protocol.head_timed_out()
        self._sweeper = self._loop.call_later(max(self.head_timeout / 4, 0.05), self._sweep)


class CoalescingTransport(asyncio.Transport):
    """A transport that holds a response head until the write after it.

    The head goes out with the next write (the body, as a rule within the same turn
    of the event loop) or, when no write follows, at the end of that turn: a head
    is never held past it.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write `data`, after the head held, or hold it if it is a response head."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        """Send what is held, then close."""
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        """Close at once; what is held is lost with the rest of the buffer."""
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        """Whether the transport is closing or closed."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401 - asyncio's signature
        """The socket's information (peername, sockname, ...)."""
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        """Stop reading (flow control)."""
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again."""
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        """Whether the transport reads."""
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        """Bytes buffered for writing, the held head included."""
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Flow control's limits."""
        self._transport.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol."""
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The connection's protocol."""
        return self._transport.get_protocol()


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head."""

    def __init__(
        self,
        *,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop,
        listener: Listener,
    ) -> None:
        super().__init__(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self._listener = listener
        self._max_head = listener.limits.max_header_bytes
        self._head = 0
        self._head_too_large = False
        # Loop time the current request head started (None once it is complete).
        self.head_since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
        self.head_since = self.loop.time()
        self._listener.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrade (WebSocket, h2c) is supported: the request is served as HTTP/1.1.
            return
        except httptools.HttpParserError:
            self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head = 0
        self.head_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.head_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request: uvicorn's keep-alive timeout applies until
        # its first byte arrives (on_message_begin).
        self.head_since = None

    def head_timed_out(self) -> None:
        """The request head took too long: close the connection without an answer."""
        self.head_since = None
        self.transport.close()

    def _count(self, size: int) -> None:
        self._head += size
        if self._head > self._max_head:
            self._head_too_large = True
            raise ValueError("request head too large")  # stops the parser

    def _refuse(self) -> None:
        if self._head_too_large:
            status, message = HEAD_TOO_LARGE, "request head larger than the limit"
        else:
            status, message = BAD_REQUEST, "malformed HTTP request"
        held = self._listener.throttle.allow("malformed")
        if held is not None:
            log.info(
                "refused malformed HTTP requests",
                extra={"server": self._listener.name, "status": status, "suppressed": held},
            )
        code = 8 if status == HEAD_TOO_LARGE else 3  # RESOURCE_EXHAUSTED, INVALID_ARGUMENT
        body = b'{"code": %d, "message": "%s"}' % (code, message.encode())
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                )
            )
        )
        self.transport.close()
