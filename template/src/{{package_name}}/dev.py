"""`dev`: serve with reload on code changes, on throwaway dependencies when needed.

When DATABASE_URL (or REDIS_URL, if set) does not answer, a throwaway PostgreSQL (or
Redis) starts from the machine's binaries (`localdeps`) and the service is pointed at
it. Then `migrate` and `serve` run as child processes, started again whenever a file
under the watched paths changes. Children run with `SHUTDOWN__DRAIN=0`, so a restart
or Ctrl-C stops them at once. On Ctrl-C or SIGTERM the child is stopped, then the
throwaway servers, and their directories are removed.

Children lead their own sessions: a terminal's Ctrl-C reaches only this process,
which stops each child with exactly one signal (a second one would force its exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg

from . import localdeps, logs
from .settings import Settings, redact

log = logging.getLogger(__name__)

PACKAGE = __name__.rpartition(".")[0]
PACKAGE_DIR = Path(__file__).resolve().parent
CHECK_TIMEOUT = 2.0
STOP_TIMEOUT = 10.0
_POLL = 0.1
EXIT_FAILURE = 1


async def postgres_problem(url: str, *, timeout: float = CHECK_TIMEOUT) -> str | None:
    """Why a session cannot be opened at `url`, or None when it can."""
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close(timeout=timeout)
    return None


async def dependencies(settings: Settings, stack: AsyncExitStack) -> dict[str, str]:
    """Environment overrides pointing at throwaway servers for what does not answer.

    The servers live until `stack` closes. Raises localdeps.LocalServerError naming
    what to install when a server is needed and its programs are missing.
    """
    overrides: dict[str, str] = {}
    problem = await postgres_problem(str(settings.database_url))
    if problem is not None:
        log.warning(
            "DATABASE_URL does not answer: starting a throwaway PostgreSQL",
            extra={"database": redact(settings.database_url), "error": problem},
        )
        postgres = await stack.enter_async_context(localdeps.postgres())
        overrides["DATABASE_URL"] = postgres.url
        _started(postgres)
    redis_url = settings.redis_url
    if redis_url is not None and not await localdeps.redis_answers(
        redis_url.host or "localhost", redis_url.port or 6379, timeout=CHECK_TIMEOUT
    ):
        log.warning(
            "REDIS_URL does not answer: starting a throwaway Redis",
            extra={"redis": redact(redis_url)},
        )
        redis = await stack.enter_async_context(localdeps.redis())
        overrides["REDIS_URL"] = redis.url
        _started(redis)
    return overrides


def _started(server: localdeps.LocalServer) -> None:
    log.info(
        "throwaway server started",
        extra={
            "server": server.name,
            "url": server.url,
            "pid": server.pid,
            "directory": str(server.directory),
        },
    )


class Child:
    """One `python -m <package> <command>` process, in a session of its own."""

    def __init__(self, command: str, env: Mapping[str, str]) -> None:
        self.command = command
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and package
            [sys.executable, "-m", PACKAGE, command],
            env=dict(env),
            start_new_session=True,
        )
        log.info("child started", extra={"command": command, "pid": self.process.pid})

    async def wait(self) -> int:
        """Wait for the process to exit; returns its exit code."""
        while (code := self.process.poll()) is None:
            await asyncio.sleep(_POLL)
        return code

    async def stop(self, *, timeout: float = STOP_TIMEOUT) -> None:
        """SIGINT (a graceful shutdown, with no drain in development), then SIGKILL."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
        if self.process.poll() is None:
            log.warning("child did not stop in time: killed", extra={"command": self.command})
            self.process.kill()
            self.process.wait()


async def _start(env: Mapping[str, str]) -> Child | None:
    """Migrate, then start `serve`; None when migrate failed (the next change retries)."""
    migrate = Child("migrate", env)
    try:
        code = await migrate.wait()
    finally:
        await migrate.stop()
    if code != 0:
        log.error("migrate failed; waiting for a change", extra={"exit_code": code})
        return None
    return Child("serve", env)


async def run(settings: Settings, *, watch: Sequence[Path]) -> int:
    """Serve with reload until SIGINT or SIGTERM; returns the exit code."""
    try:
        # A development dependency: production images have no use for it.
        import watchfiles  # noqa: PLC0415
    except ImportError:
        log.error(  # noqa: TRY400 - the message says what to do
            "dev needs the development dependencies (watchfiles): run `uv sync` in the "
            "project, then this command through `uv run`"
        )
        return EXIT_FAILURE

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        flusher = asyncio.create_task(logs.flush_periodically(), name="log-flush")
        stack.callback(flusher.cancel)
        try:
            overrides = await dependencies(settings, stack)
        except localdeps.LocalServerError as exc:
            log.error("cannot start the development dependencies: %s", exc)  # noqa: TRY400
            return EXIT_FAILURE
        env = {**os.environ, **overrides, "SHUTDOWN__DRAIN": "0"}
        child: Child | None = None
        try:
            child = await _start(env)
            log.info("watching for changes", extra={"paths": [str(p) for p in watch]})
            async for changes in watchfiles.awatch(*watch, stop_event=stop):
                changed = sorted(path for _, path in changes)
                log.info("change detected: restarting", extra={"changed": changed[:5]})
                if child is not None:
                    await child.stop()
                child = await _start(env)
        finally:
            if child is not None:
                with contextlib.suppress(ProcessLookupError):
                    await child.stop()
    log.info("development server stopped")
    return 0
