"""Signals and the graceful shutdown sequence.

The first SIGTERM or SIGINT starts a graceful shutdown; a second one forces a
fast exit. Without a terminal, a SIGINT that comes within DUPLICATE_WINDOW of a
first SIGINT is the same one delivered twice: `uv run` without a terminal forwards
the SIGINT its process group (the service included) already received
(astral-sh/uv#13925), and one interrupt must not count as two.

Handlers are installed with `loop.add_signal_handler`, which runs them on the
loop, so they only set events: the shutdown itself is a coroutine that the loop
runs, and a handler cannot await it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import grpc

from .chain import TaskTracker
from .health import Health
from .httpserver import HttpServer
from .settings import ShutdownSettings

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A second signal this soon after the first is the same one delivered twice.
DUPLICATE_WINDOW = 0.5


class Signals:
    """`stop` is set by the first signal, `force` by the second."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self._first: tuple[signal.Signals, float] | None = None

    def install(self) -> None:
        """Take over SIGTERM and SIGINT on the running loop."""
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self, *, ignore: bool = False) -> None:
        """Give SIGTERM and SIGINT back to their defaults, or ignore them (`ignore`).

        After a graceful shutdown the process only exits: a late signal must not end
        it with a KeyboardInterrupt instead of its exit code.
        """
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
            if ignore:
                signal.signal(sig, signal.SIG_IGN)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = asyncio.get_running_loop().time()
        first = self._first
        if first is not None and _duplicate(first, sig, now):
            log.debug("signal ignored: the one just received, delivered again")
            return
        if first is None:
            self._first = (sig, now)
            log.info("shutdown requested", extra={"signal": sig.name})
            if sig == signal.SIGINT and sys.stdin is not None and sys.stdin.isatty():
                # Ctrl-C in a terminal: a person waits for the drain and grace to pass.
                log.info("press Ctrl-C again to stop at once")
            self.stop.set()
        else:
            log.warning("second signal: forcing exit", extra={"signal": sig.name})
            self.force.set()


def _duplicate(first: tuple[signal.Signals, float], sig: signal.Signals, now: float) -> bool:
    """Whether `sig` at `now` is the first signal delivered again (see the docstring)."""
    first_sig, at = first
    interactive = sys.stdin is not None and sys.stdin.isatty()
    return sig == first_sig == signal.SIGINT and not interactive and now - at < DUPLICATE_WINDOW


async def graceful(
    settings: ShutdownSettings,
    *,
    health: Health,
    server: grpc.aio.Server,
    tracker: TaskTracker,
    http_servers: Sequence[HttpServer],
) -> None:
    """Drain, stop the gRPC server and `http_servers` together, wait for handlers.

    The caller closes the pools afterwards.

    Total time is at most drain + grace + max(grace, 1): in-flight requests finish
    within the grace, new ones are refused once the listeners stop, and handlers
    still running after their cancellation get one more bounded wait.
    """
    # Phase 1: report NOT_SERVING (gRPC health, /readyz 503) and end Watch streams,
    # so load balancers stop sending new work.
    await health.drain()
    # Phase 2: keep serving while endpoints are removed; Kubernetes does that in
    # parallel with sending SIGTERM, so traffic still arrives for a few seconds.
    log.info("draining", extra={"drain_s": settings.drain})
    await asyncio.sleep(settings.drain)
    # Phase 3: stop accepting; in-flight RPCs get the grace period.
    log.info("stopping listeners", extra={"grace_s": settings.grace})
    await asyncio.gather(server.stop(settings.grace), *(s.stop() for s in http_servers))
    # Phase 4: stop() can return before aborted handlers ran their finally blocks
    # (grpc/grpc#37239); wait for them before the pools they use are closed.
    still_running = await tracker.wait(timeout=max(settings.grace, 1.0))
    if still_running:
        log.warning("handlers still running at shutdown", extra={"tasks": still_running})
