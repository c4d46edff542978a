"""An embedded uvicorn server that runs on our loop and obeys our shutdown.

uvicorn's `serve()` takes over SIGINT/SIGTERM and re-raises the signal after its
own shutdown, which would kill the process before the gRPC server and the pools
are closed (`capture_signals`, added in Kludex/uvicorn#1600); the subclass turns that
off. We bind the socket ourselves so a busy port is a clear error instead of
uvicorn's `sys.exit`, and accept connections ourselves (`Listener`): asyncio's own
accept loop, on EMFILE, logs an ERROR with a traceback once per pending connection
and per loop turn, which starved the loop when descriptors ran out. uvicorn still
runs every connection (its httptools protocol, keep-alive and graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from dataclasses import dataclass
from typing import Any

import uvicorn

from .connections import ConnectionLimits, Listener

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Pending connections the kernel queues for a listener before refusing more.
BACKLOG = 1024


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals belong to shutdown.py.
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; raises OSError naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP named, not 0: accepted sockets inherit it, and asyncio sets
    # TCP_NODELAY only on sockets that say TCP. Without it a response written in two
    # parts (head, body) waits for the client's delayed ACK: some 40 ms a request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)  # noqa: FBT003 - socket API
    return sock


@dataclass(frozen=True)
class Timeouts:
    """How long connections may idle, and how long shutdown waits for them.

    `keep_alive`: an idle connection between two requests is closed after this.
    `head`: a client has this long to send a complete request head (request line
    and headers), from connecting or from the first byte of its next request.
    `shutdown`: requests still running when the server stops get this long.
    """

    keep_alive: float = 5.0
    head: float = 10.0
    shutdown: float = 1.0


class HttpServer:
    """An ASGI app served on host:port until `stop()`."""

    def __init__(  # noqa: PLR0913 - one keyword per knob, all with defaults
        self,
        app: ASGIApp,
        *,
        host: str,
        port: int,
        name: str,
        timeouts: Timeouts | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.limits = limits or ConnectionLimits()
        self._config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            # No WebSocket: an Upgrade request is served as plain HTTP/1.1.
            ws="none",
            # uvicorn takes whole seconds here; never round a short grace down to 0.
            timeout_graceful_shutdown=math.ceil(self.timeouts.shutdown),
            timeout_keep_alive=max(1, math.ceil(self.timeouts.keep_alive)),
            server_header=False,
        )
        self._host, self._port, self.name = host, port, name
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None
        self._listener: Listener | None = None

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one picked for port 0)."""
        return self._port

    async def start(self) -> None:
        """Bind and start serving; returns once connections are accepted."""
        sock = bind(self._host, self._port)
        self._port = int(sock.getsockname()[1])
        # No sockets for uvicorn: the Listener accepts, uvicorn serves each connection.
        self._task = asyncio.create_task(self._server.serve(sockets=[]), name=self.name)
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()
                raise RuntimeError(f"{self.name} HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        self._listener = Listener(
            sock,
            self._server,
            name=self.name,
            limits=self.limits,
            head_timeout=self.timeouts.head,
        )
        self._listener.start()
        log.info("http server listening", extra={"server": self.name, "port": self._port})

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (bounded), then return.

        Idle connections are closed at once; a request still running gets its
        response with `Connection: close`.
        """
        if self._task is None:
            return
        if self._listener is not None:
            self._listener.stop()
        self._server.should_exit = True
        timeout = (self._config.timeout_graceful_shutdown or 0) + 1.0
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            log.warning("http server did not stop in time", extra={"server": self.name})
        else:
            log.info("http server stopped", extra={"server": self.name})
        self._task = None
