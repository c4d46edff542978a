"""Throwaway PostgreSQL and Redis servers from the machine's own binaries.

`dev` runs on them when no database or Redis is reachable, and tests use them to
break a dependency on purpose: `pause()`/`resume()` (SIGSTOP/SIGCONT, a server
that hangs), `kill()` (a crash), `restart()`. Each server lives in a temporary
directory on a free loopback port and in a session of its own, so a terminal's
Ctrl-C reaches only its owner, which stops it; leaving `postgres()` or `redis()`
stops the server and removes its directory, on errors and cancellation too.

Processes are plain `subprocess.Popen` objects, polled rather than awaited, so a
server can be started on one event loop and stopped on another (pytest fixtures).
Imports nothing from this package.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import asyncpg

_POLL = 0.05
_LOG_TAIL = 2000
_PORT_ATTEMPTS = 3
_POSTGRES_SEARCH = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # Fedora, RHEL (PGDG)
    "/opt/homebrew/opt/postgresql*/bin",  # macOS, Apple silicon
    "/usr/local/opt/postgresql*/bin",  # macOS, Intel
)
POSTGRES_INSTALL_HINT = (
    "install the PostgreSQL server: `sudo apt-get install postgresql` (Debian, Ubuntu), "
    "`sudo dnf install postgresql-server` (Fedora) or `brew install postgresql@17` (macOS); "
    "or set DATABASE_URL to a server you run"
)
REDIS_INSTALL_HINT = (
    "install Redis: `sudo apt-get install redis-server` (Debian, Ubuntu), "
    "`sudo dnf install redis` (Fedora) or `brew install redis` (macOS); "
    "or set REDIS_URL to a server you run"
)


class LocalServerError(RuntimeError):
    """A throwaway server could not be found, started or stopped."""


def _version_key(path: Path) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in str(path))
    return tuple(int(part) for part in digits.split())


def find_postgres(path: str | None = None, search: Iterable[str] = _POSTGRES_SEARCH) -> Path:
    """The directory holding `initdb` and `postgres`; raises LocalServerError naming the fix.

    Looks on `path` (default: $PATH; symlinks such as Debian's are followed), then in the
    `search` patterns, newest version first.
    """
    candidates: list[Path] = []
    for name in ("postgres", "initdb"):
        found = shutil.which(name, path=path)
        if found is not None:
            candidates.append(Path(found).resolve().parent)
    for pattern in search:
        anchor = Path(Path(pattern).anchor)
        matches = anchor.glob(str(Path(pattern).relative_to(anchor)))
        candidates += sorted(matches, key=_version_key, reverse=True)
    for directory in candidates:
        if all((directory / name).is_file() for name in ("initdb", "postgres")):
            return directory
    where = ", ".join(["PATH", *search])
    raise LocalServerError(f"initdb and postgres were not found ({where}): {POSTGRES_INSTALL_HINT}")


def find_redis(path: str | None = None) -> Path:
    """The `redis-server` program; raises LocalServerError naming the fix."""
    found = shutil.which("redis-server", path=path)
    if found is None:
        raise LocalServerError(f"redis-server was not found on PATH: {REDIS_INSTALL_HINT}")
    return Path(found)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unprivileged_user() -> str | None:
    """Who runs PostgreSQL when we are root (it refuses to run as root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise LocalServerError("running as root, and neither a `postgres` nor a `nobody` user exists")


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, from /proc (Linux) or `pgrep -P` (elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The fields after the command name, which may hold spaces and parentheses.
                fields = stat.read_text().rpartition(")")[2].split()
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        if proc.is_dir():
            direct = children.get(parent, [])
        else:
            pgrep = subprocess.run(  # noqa: S603 - fixed argv
                ["pgrep", "-P", str(parent)],  # noqa: S607 - a system tool, found on PATH
                capture_output=True,
                text=True,
                check=False,
            )
            direct = [int(line) for line in pgrep.stdout.split()]
        found += direct
        todo += direct
    return found


def _tail(log: Path) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL:].strip()
    except OSError:
        return ""


class LocalServer(abc.ABC):
    """One server process: start, stop, and the ways tests break it.

    The process leads a session of its own; `pause`, `resume` and `kill` signal its
    children too (PostgreSQL's backends). Not safe to share between threads.
    """

    name = "server"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.log = directory / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where clients connect."""

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        """True while the process exists (paused included)."""
        return self._process is not None and self._process.poll() is None

    @abc.abstractmethod
    def _argv(self) -> list[str]:
        """The server's command line."""

    @abc.abstractmethod
    async def _ready(self, *, timeout: float) -> bool:
        """Whether the server accepts clients now."""

    def _user(self) -> str | None:
        return None

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts clients (at most `timeout` seconds).

        A port taken since it was chosen is retried on another free port.
        """
        if self.running:
            return
        for attempt in range(_PORT_ATTEMPTS):
            if await self._start_once(timeout=timeout):
                return
            if attempt + 1 < _PORT_ATTEMPTS and "in use" in _tail(self.log):
                self.port = free_port()
                continue
            break
        raise LocalServerError(f"{self.name} did not start; its log ends:\n{_tail(self.log)}")

    async def _start_once(self, *, timeout: float) -> bool:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our own argv
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                user=self._user(),
            )
        self._paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            if await self._ready(timeout=min(1.0, max(deadline - time.monotonic(), 0.01))):
                return True
            await asyncio.sleep(_POLL)
        await self.stop(timeout=1.0)
        raise LocalServerError(
            f"{self.name} did not accept clients within {timeout:g} s; its log ends:\n"
            f"{_tail(self.log)}"
        )

    def _signal_all(self, sig: signal.Signals) -> None:
        """Signal the server and every process under it.

        PostgreSQL's backends call setsid(), so its process group holds the postmaster
        alone: the children are found by parent pid, before the leader is signalled.
        """
        if self._process is None or self._process.poll() is not None:
            return
        for pid in [self._process.pid, *_descendants(self._process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """Freeze the server and its children (SIGSTOP): connections hang, nothing answers."""
        self._signal_all(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo `pause()` (SIGCONT)."""
        self._signal_all(signal.SIGCONT)
        self._paused = False

    def kill(self) -> None:
        """Crash the server and its children at once (SIGKILL); reaped, files kept."""
        self._signal_all(signal.SIGKILL)
        if self._process is not None:
            self._process.wait()
        self._paused = False

    async def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully, or kill after `timeout` seconds. Data files are kept."""
        if self._process is None or self._process.poll() is not None:
            return
        if self._paused:
            self.resume()
        self._process.send_signal(self._stop_signal())
        deadline = time.monotonic() + timeout
        while self._process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
        if self._process.poll() is None:
            self.kill()

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGTERM

    async def restart(self, *, timeout: float = 30.0) -> None:
        """Stop (gracefully), then start on the same port with the same data."""
        await self.stop()
        await self.start(timeout=timeout)


class LocalPostgres(LocalServer):
    """A PostgreSQL cluster with trust authentication for the user `postgres`."""

    name = "postgres"

    def __init__(self, directory: Path, bindir: Path) -> None:
        super().__init__(directory)
        self.bindir = bindir
        self.data = directory / "data"

    @property
    def url(self) -> str:
        """DSN of the `postgres` database as the `postgres` superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _user(self) -> str | None:
        return _unprivileged_user()

    async def init(self, *, timeout: float = 60.0) -> None:
        """Create the cluster (initdb, without fsync: the data is thrown away)."""
        argv = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres"]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-sync"]
        with self.log.open("ab") as log:
            process = subprocess.Popen(  # noqa: S603 - our own argv
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
                user=self._user(),
            )
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise LocalServerError(f"initdb took longer than {timeout:g} s")
            await asyncio.sleep(_POLL)
        if process.returncode != 0:
            raise LocalServerError(f"initdb failed; its log ends:\n{_tail(self.log)}")

    def _argv(self) -> list[str]:
        # No flushing to disk: a throwaway cluster need not survive the machine crashing.
        # Commits still reach the kernel, so data survives `kill()` and `restart()`.
        settings = ("fsync=off", "full_page_writes=off")
        argv = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        argv += ["-h", "127.0.0.1", "-k", str(self.directory)]
        for setting in settings:
            argv += ["-c", setting]
        return argv

    def _stop_signal(self) -> signal.Signals:
        return signal.SIGINT  # "fast" shutdown: ends sessions, no waiting for clients

    async def _ready(self, *, timeout: float) -> bool:
        try:
            conn = await asyncpg.connect(self.url, timeout=timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        await conn.close(timeout=timeout)
        return True


class LocalRedis(LocalServer):
    """A Redis server without persistence."""

    name = "redis"

    def __init__(self, directory: Path, program: Path) -> None:
        super().__init__(directory)
        self.program = program

    @property
    def url(self) -> str:
        """URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            str(self.program),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
        ]

    async def _ready(self, *, timeout: float) -> bool:
        return await redis_answers("127.0.0.1", self.port, timeout=timeout)


async def redis_answers(host: str, port: int, *, timeout: float) -> bool:
    """True when something at host:port answers a Redis PING (any reply, an auth error too)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                reply = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return reply[:1] in {b"+", b"-"}


def _directory(prefix: str, owner: str | None) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        shutil.chown(directory, user=owner)
    return directory


async def _cleanup(server: LocalServer, cleanup: Sequence[Path]) -> None:
    try:
        await server.stop()
    except BaseException:
        server.kill()  # cancelled while stopping: never leave the process behind
        raise
    finally:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def postgres(*, timeout: float = 60.0) -> AsyncIterator[LocalPostgres]:
    """A fresh PostgreSQL cluster, started; stopped and deleted on exit.

    Raises LocalServerError (naming what to install) when the programs are missing.
    """
    bindir = find_postgres()
    directory = _directory("localdeps-postgres-", _unprivileged_user())
    server = LocalPostgres(directory, bindir)
    try:
        await server.init(timeout=timeout)
        await server.start(timeout=timeout)
        yield server
    finally:
        await _cleanup(server, [directory])


@contextlib.asynccontextmanager
async def redis(*, timeout: float = 30.0) -> AsyncIterator[LocalRedis]:
    """A fresh Redis server, started; stopped and deleted on exit.

    Raises LocalServerError (naming what to install) when redis-server is missing.
    """
    program = find_redis()
    directory = _directory("localdeps-redis-", None)
    server = LocalRedis(directory, program)
    try:
        await server.start(timeout=timeout)
        yield server
    finally:
        await _cleanup(server, [directory])
