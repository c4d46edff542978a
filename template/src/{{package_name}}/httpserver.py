"""An embedded uvicorn server that runs on our loop and obeys our shutdown.

uvicorn's `serve()` takes over SIGINT/SIGTERM and re-raises the signal after its
own shutdown, which would kill the process before the gRPC server and the pools
are closed (`capture_signals`, added in Kludex/uvicorn#1600); the subclass turns that
off. We bind the socket ourselves so a busy port is a clear error instead of
uvicorn's `sys.exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Generator, MutableMapping
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Signals belong to shutdown.py.
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; raises OSError naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)  # noqa: FBT003 - socket API
    return sock


class HttpServer:
    """An ASGI app served on host:port until `stop()`."""

    def __init__(
        self, app: ASGIApp, *, host: str, port: int, name: str, shutdown_timeout: float
    ) -> None:
        self._config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=math.ceil(shutdown_timeout),
            server_header=False,
        )
        self._host, self._port, self.name = host, port, name
        self._server = _Server(self._config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and start serving; returns once requests are accepted."""
        sock = bind(self._host, self._port)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name=self.name)
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"{self.name} HTTP server stopped during startup")
            await asyncio.sleep(0.01)
        log.info("http server listening", extra={"server": self.name, "port": self._port})

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (bounded), then return."""
        if self._task is None:
            return
        self._server.should_exit = True
        timeout = (self._config.timeout_graceful_shutdown or 0) + 1.0
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            log.warning("http server did not stop in time", extra={"server": self.name})
        else:
            log.info("http server stopped", extra={"server": self.name})
        self._task = None
