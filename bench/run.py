"""Benchmark: GetItem throughput and latency, generated service vs a bare grpc.aio server.

Renders the template with default answers, installs it, migrates a fresh PostgreSQL
database and stores one item. Then it starts, as separate processes on 127.0.0.1:

- `bare`: bench/bare_server.py, GetItem only, same query and asyncpg pool size;
- `service`: the generated service (`<slug> serve`) with the production log
  settings, JSON at INFO (one line per request), to a file;
- `service-quiet` (optional): the same with LOG__LEVEL=WARNING;
- `bare-no-reset` (optional): the bare server with a pool that does not reset
  sessions on release, as the service does by default: the service against it
  is the cost of the template's own request path alone;

and drives each with h2load (bench/h2load.py), an external HTTP/2 load generator
written in C, at several concurrency levels over several connections (default
8, 32, 256 and 1000 streams). Within a level the targets alternate round by
round (order reversed on odd rounds) so drift on a shared machine hits all of
them alike. Per target and level it reports the median over rounds of
throughput, p50 and p99 latency and the server's CPU time per request, and the
ratios service/bare. Goal: throughput >= 0.90 of bare and p99 <= 1.2x bare at
every level.

A benchmark is not a timed assertion: the exit status is non-zero only on errors
(a failed call, a process that would not start), never on a ratio. Results go
to .bench/results.json.

`--callgrind` measures instead the instructions each server executes per request,
under valgrind's callgrind, counting only while exactly `--requests` requests run
(driven by bench/loadgen.py, a Python client that can stop at an exact count).
That count does not depend on what else the machine does, so it shows changes of
a few percent that throughput on a shared machine hides. Under valgrind a
request takes some fifty times longer, so whatever caches by wall time (the
alarm clock's ticks, the log's formatted second) is rebuilt more often than in
real life: the count overstates their cost.

    nox -s bench -- --seconds 3 --rounds 1 --levels 32   # a quick look
    nox -s bench                                         # the default
    nox -s bench -- --callgrind                          # instructions per request
    nox -s bench -- --scenario gateway --levels 32       # the HTTP/JSON gateway
    nox -s bench -- --scenario cache --levels 32         # GetItem from Redis (bench/cache.py)

`--scenario gateway` measures GetItem over the gateway (wrk, an external HTTP/1.1
load generator in C, on keep-alive connections) against (a) the same service's gRPC
GetItem (h2load), (b) bench/bare_http.py, a bare uvicorn + httptools endpoint
running the same query through asyncpg and answering the same JSON (orjson), and
(c) `required-http`, that endpoint doing inline the work every gateway request must
do (id check, domain Item, protobuf message, proto3 JSON, request id, deadline,
request scope, the JSON log line), in one run, alternating. Goal: the gateway >=
0.80 of the bare HTTP endpoint's throughput; p50 and p99 for all four.

`--scenario cache` measures GetItem on a cache hit, on a miss, and a bare grpc.aio
server reading the same entry from Redis (bench/cache.py, bench/bare_redis.py), in one
run, alternating. Goal: the hit >= 0.85 of the bare server's throughput, and faster
than the miss. Needs Redis (`--redis`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import importlib
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import asyncpg
import cache
import h2load
import observability
import overload
import psutil
import wrk

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = ROOT / ".bench" / "results.json"
GOAL_THROUGHPUT = 0.90
GOAL_P99 = 1.2
GOAL_GATEWAY = 0.80
TARGETS = (
    "bare",
    "bare-no-reset",
    "service",
    "service-quiet",
    "service-plain",
    "service-traced",
)
SERVICE = "acme.items.v1.ItemService"  # proto_package of the default answers
# Concurrency levels: requests in flight, over several connections as real clients do.
LEVELS = {
    "8": h2load.Level(2, 4),
    "32": h2load.Level(4, 8),
    "256": h2load.Level(16, 16),
    "1000": h2load.Level(20, 50),
}
PACKAGE = "acme_items"  # package_name of the default answers
SLUG = "acme-items"
# The service's pool defaults (settings.DatabaseSettings); the bare server uses the same.
POOL_MIN, POOL_MAX = 2, 10
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# Under valgrind a server starts and stops some 50 times slower.
VALGRIND_SLOWDOWN = 10.0
CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no")
US = 1e6


def _support() -> ModuleType:
    """tests/support.py: render, run, uv_sync, tool_env, free_port."""
    sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("support")


# --- database -------------------------------------------------------------------------


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql, timeout=30)
    finally:
        await conn.close(timeout=5)


async def _insert_item(dsn: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        item_id = await conn.fetchval(
            "INSERT INTO items (name, description) VALUES ($1, $2) RETURNING id",
            "benchmark item",
            "An item of typical size, read over and over by the benchmark. " * 2,
        )
    finally:
        await conn.close(timeout=5)
    return str(item_id)


@contextlib.contextmanager
def database(server: str) -> Iterator[tuple[str, str]]:
    """A fresh database on `server` (a DSN without a database): yields (name, dsn)."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = f"{server}/postgres"
    asyncio.run(_execute(admin, f'CREATE DATABASE "{name}"'))
    try:
        yield name, f"{server}/{name}"
    finally:
        asyncio.run(_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- processes ------------------------------------------------------------------------


@dataclass
class Env:
    """Where the benchmark runs: the project, the work directory and the database."""

    project: Path
    work: Path
    dsn: str
    db_name: str
    support: ModuleType
    item_id: str = ""
    # The encoded GetItemRequest of that item, and the file h2load sends (framed).
    request: bytes = b""
    payload: Path = Path()
    # Servers run under callgrind, each writing <work>/<target>.callgrind.
    callgrind: bool = False

    def bin(self, name: str) -> str:
        """A program of the project's environment."""
        return str(self.project / ".venv" / "bin" / name)

    @property
    def patience(self) -> float:
        """How much longer than usual servers take to start and stop."""
        return VALGRIND_SLOWDOWN if self.callgrind else 1.0

    def server_command(self, name: str, args: list[str]) -> list[str]:
        """`args` (a Python program of the project and its arguments), run as `name`."""
        command = [self.bin("python"), *args]
        if self.callgrind:
            out = self.work / f"{name}.callgrind"
            command = [*CALLGRIND, f"--callgrind-out-file={out}", *command]
        return command


@dataclass
class Target:
    """A server under test."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    patience: float = 1.0
    # The gateway's port, for the service.
    http_port: int = 0

    @property
    def process(self) -> psutil.Process:
        """The server process, for CPU accounting."""
        return psutil.Process(self.proc.pid)


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _wait_until(target: Target, ready: Callable[[], bool], what: str) -> None:
    limit = STARTUP_TIMEOUT * target.patience
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if target.proc.poll() is not None:
            raise RuntimeError(
                f"{target.name} exited {target.proc.returncode} before {what}:\n{_tail(target.log)}"
            )
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{target.name} not {what} after {limit} s:\n{_tail(target.log)}")


def _readyz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )


# grpc core's backlog for the scenarios that measure the request path's cost: a closed
# loop of 1,000 streams keeps more calls waiting for the event loop than the service's
# default backlog takes (refusing them is load shedding, measured by `overload`).
PATH_BACKLOG = "4096"


def start_service(
    env: Env,
    name: str,
    *,
    level: str,
    settings: dict[str, str] | None = None,
    backlog: str | None = PATH_BACKLOG,
) -> Target:
    """The generated service as a process, JSON logs at `level` to a file; waits for /readyz.

    `settings`: environment variables on top of the benchmark's own. `backlog`:
    GRPC__MAX_PENDING_CALLS, or None for the service's default.

    The Redis cache is off unless `settings` turn it on: every scenario but `cache`
    compares the service with a bare server that runs the same PostgreSQL query, and a
    default render reads GetItem from Redis once it is cached.
    """
    grpc_port, admin_port, http_port = (env.support.free_port() for _ in range(3))
    cache = (
        {"CACHE__ENABLED": "false"} if (env.project / "src" / PACKAGE / "cache.py").exists() else {}
    )
    variables = env.support.tool_env(
        DATABASE_URL=env.dsn,
        GRPC_PORT=str(grpc_port),
        ADMIN_PORT=str(admin_port),
        HTTP_PORT=str(http_port),
        GRPC__HOST="127.0.0.1",
        ADMIN__HOST="127.0.0.1",
        GATEWAY__HOST="127.0.0.1",
        LOG__FORMAT="json",
        LOG__LEVEL=level,
        # Teardown speed only; draining is not what is measured.
        SHUTDOWN__DRAIN="0",
        **({} if backlog is None else {"GRPC__MAX_PENDING_CALLS": backlog}),
        **(cache | (settings or {})),
    )
    log = env.work / f"{name}.log"
    command = env.server_command(name, [env.bin(SLUG), "serve"])
    proc = _spawn(command, variables, log, env.work)
    target = Target(name, grpc_port, proc, log, env.patience, http_port)
    _wait_until(target, lambda: _readyz(admin_port), "ready (/readyz 200)")
    return target


def start_bare_http(env: Env, name: str = "bare-http", *, required_work: bool = False) -> Target:
    """bench/bare_http.py (uvicorn + asyncpg) in the project's environment.

    `required_work`: with the work every gateway request must do (`--required-work`).
    """
    port = env.support.free_port()
    args = [
        str(BENCH / "bare_http.py"),
        f"--dsn={env.dsn}",
        f"--port={port}",
        f"--min-size={POOL_MIN}",
        f"--max-size={POOL_MAX}",
        f"--package={PACKAGE}",
        *(["--required-work"] if required_work else []),
    ]
    log = env.work / f"{name}.log"
    proc = _spawn(env.server_command(name, args), env.support.tool_env(), log, env.work)
    target = Target(name, port, proc, log, env.patience, http_port=port)
    _wait_until(target, lambda: "READY" in _tail(log), "ready (READY line)")
    return target


def start_script(env: Env, name: str, args: list[str]) -> Target:
    """bench/<name>.py (dashes as underscores) with `args` and `--port`; waits for READY."""
    port = env.support.free_port()
    script = BENCH / f"{name.replace('-', '_')}.py"
    log = env.work / f"{name}.log"
    command = env.server_command(name, [str(script), *args, f"--port={port}"])
    proc = _spawn(command, env.support.tool_env(), log, env.work)
    target = Target(name, port, proc, log, env.patience)
    _wait_until(target, lambda: "READY" in _tail(log), "ready (READY line)")
    return target


def start_bare(env: Env, name: str = "bare") -> Target:
    """bench/bare_server.py in the project's environment; waits for its READY line."""
    port = env.support.free_port()
    args = [
        str(BENCH / "bare_server.py"),
        f"--package={PACKAGE}",
        f"--dsn={env.dsn}",
        f"--port={port}",
        f"--min-size={POOL_MIN}",
        f"--max-size={POOL_MAX}",
        *(["--no-reset"] if name == "bare-no-reset" else []),
    ]
    log = env.work / f"{name}.log"
    proc = _spawn(env.server_command(name, args), env.support.tool_env(), log, env.work)
    target = Target(name, port, proc, log, env.patience)
    _wait_until(target, lambda: "READY" in _tail(log), "ready (READY line)")
    return target


def _project_python(env: Env, code: str, *args: str) -> str:
    """Run `code` with the project's Python (it has the generated stubs); its stdout."""
    proc = subprocess.run(
        [env.bin("python"), "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
        env=env.support.tool_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the project's Python failed:\n{proc.stderr}")
    return proc.stdout.strip()


def _encoded_request(env: Env, item_id: str | None = None) -> bytes:
    """GetItemRequest of the benchmark's item (or `item_id`), serialized."""
    code = (
        "import sys\n"
        f"from {PACKAGE}.v1 import items_pb2\n"
        "print(items_pb2.GetItemRequest(id=sys.argv[1]).SerializeToString().hex())"
    )
    return bytes.fromhex(_project_python(env, code, item_id or env.item_id))


def check_call(env: Env, target: Target, item_id: str | None = None) -> None:
    """One real gRPC call: the target answers GetItem with OK and the right item."""
    item_id = item_id or env.item_id
    code = (
        "import sys, grpc\n"
        f"from {PACKAGE}.v1 import items_pb2, items_pb2_grpc\n"
        "with grpc.insecure_channel(sys.argv[1]) as channel:\n"
        "    stub = items_pb2_grpc.ItemServiceStub(channel)\n"
        "    print(stub.GetItem(items_pb2.GetItemRequest(id=sys.argv[2]), timeout=10).id)"
    )
    answered = _project_python(env, code, f"127.0.0.1:{target.port}", item_id)
    if answered != item_id:
        raise RuntimeError(f"{target.name} answered item {answered!r}, expected {item_id!r}")


def start(env: Env, name: str) -> Target:
    """Start the target called `name` (one of TARGETS).

    `service-plain` has metrics off; `service-traced` traces 10 % of the requests to
    an OTLP receiver (bench/observability.py), which runs until the benchmark exits.
    """
    if name.startswith("bare"):
        return start_bare(env, name)
    settings = {}
    if name == "service-plain":
        settings = dict(observability.TARGETS["plain"])
    elif name == "service-traced":
        receiver, port = observability.receiver(env)
        atexit.register(receiver.kill)
        settings = {
            **observability.TARGETS["observed"],
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        }
    level = "WARNING" if name == "service-quiet" else "INFO"
    return start_service(env, name, level=level, settings=settings)


def stop(target: Target) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if target.proc.poll() is not None:
        return
    target.proc.send_signal(signal.SIGTERM)
    try:
        target.proc.wait(timeout=STOP_TIMEOUT * target.patience)
    except subprocess.TimeoutExpired:
        target.proc.kill()
        target.proc.wait(timeout=STOP_TIMEOUT)


# --- measurement ----------------------------------------------------------------------


@dataclass
class Snapshot:
    """CPU seconds consumed so far."""

    server_user: float
    server_system: float
    postgres: dict[int, float]
    busy: float


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


def _postgres_backends(db_name: str) -> dict[int, float]:
    """CPU seconds of the PostgreSQL backends connected to the benchmark database."""
    found: dict[int, float] = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("postgres:") and db_name in " ".join(cmdline):
            found[proc.pid] = _cpu(proc.info["cpu_times"])
    return found


def snapshot(server: psutil.Process, db_name: str) -> Snapshot:
    """CPU used so far by the server, by the benchmark's PostgreSQL backends and by all."""
    system = psutil.cpu_times()
    idle = system.idle + getattr(system, "iowait", 0.0)
    times = server.cpu_times()
    return Snapshot(
        server_user=times.user,
        server_system=times.system,
        postgres=_postgres_backends(db_name),
        busy=sum(system) - idle,
    )


def measure(
    env: Env, target: Target, level: h2load.Level, args: argparse.Namespace
) -> dict[str, Any]:
    """One measured h2load run against `target` after an unmeasured warm-up run."""
    url = f"http://127.0.0.1:{target.port}/{SERVICE}/GetItem"
    headers = (f"grpc-timeout: {args.grpc_timeout}",) if args.grpc_timeout else ()

    def load(seconds: float) -> Any:
        return h2load.run(url, env.payload, level, seconds, headers=headers)

    return _accounted(env, target, level, args, load)


def measure_http(
    env: Env, target: Target, level: h2load.Level, args: argparse.Namespace, name: str
) -> dict[str, Any]:
    """One measured wrk run of GET /v1/items/<id> on the target's HTTP port."""
    url = f"http://127.0.0.1:{target.http_port}/v1/items/{env.item_id}"
    headers = (f"grpc-timeout: {args.grpc_timeout}",) if args.grpc_timeout else ()

    def load(seconds: float) -> Any:
        return wrk.run(url, level.concurrency, seconds, headers=headers)

    return _accounted(env, target, level, args, load) | {"target": name}


def _accounted(
    env: Env,
    target: Target,
    level: h2load.Level,
    args: argparse.Namespace,
    load: Callable[[float], Any],
) -> dict[str, Any]:
    """Run `load` for a warm-up, then measured, with the CPU each side spent."""
    if args.warmup > 0:
        load(args.warmup)
    server = target.process
    start = snapshot(server, env.db_name)
    result = load(args.seconds)
    end = snapshot(server, env.db_name)
    done = max(1, result.succeeded)
    server_cpu = (end.server_user - start.server_user) + (end.server_system - start.server_system)
    postgres = sum(cpu - start.postgres.get(pid, 0.0) for pid, cpu in end.postgres.items())
    busy = end.busy - start.busy
    return {
        "target": target.name,
        "level": str(level),
        "rps": result.rps,
        "requests": result.succeeded,
        "failed": result.failed,
        "p50_ms": result.percentile_ms(0.50),
        "p99_ms": result.percentile_ms(0.99),
        "server_cpu_us_per_req": server_cpu / done * US,
        "server_system_us_per_req": (end.server_system - start.server_system) / done * US,
        "postgres_cpu_us_per_req": postgres / done * US,
        # Cores kept busy by everything but the server, PostgreSQL and h2load's own
        # share: a machine that was not quiet shows here.
        "machine_cores": busy / result.seconds,
    }


# --- instruction counts (callgrind) ---------------------------------------------------


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


@dataclass
class Load:
    """Settings of the load generator."""

    warmup: float
    seconds: float
    concurrency: int
    channels: int

    def args(self) -> list[str]:
        """Load generator arguments common to both kinds of window."""
        return [
            f"--warmup={self.warmup}",
            f"--concurrency={self.concurrency}",
            f"--channels={self.channels}",
        ]


def run_loadgen(
    env: Env,
    target: Target,
    load_args: list[str],
    *,
    limit: float,
    on_mark: Callable[[str, subprocess.Popen[str]], None],
) -> dict[str, Any]:
    """Run bench/loadgen.py with `load_args` against `target` and return its RESULT.

    `on_mark(mark, client)` runs when the client prints START and END. Gives up
    after `limit` seconds.
    """
    args = [
        env.bin("python"),
        str(BENCH / "loadgen.py"),
        f"--package={PACKAGE}",
        f"--target=127.0.0.1:{target.port}",
        f"--item-id={env.item_id}",
        *load_args,
    ]
    errlog = env.work / "loadgen.err"
    lines: queue.Queue[str | None] = queue.Queue()
    with errlog.open("w") as err:
        client = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.PIPE, text=True
        )
    assert client.stdout is not None
    threading.Thread(target=_pump, args=(client.stdout, lines), daemon=True).start()
    deadline = time.monotonic() + limit
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"load generator timed out against {target.name}") from None
            if line is None:
                raise RuntimeError(
                    f"load generator against {target.name} exited {client.wait(timeout=10)}:\n"
                    f"{_tail(errlog)}"
                )
            if line in {"START", "END"}:
                on_mark(line, client)
            elif line.startswith("RESULT "):
                result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
                client.wait(timeout=STOP_TIMEOUT)
                return result
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=STOP_TIMEOUT)


def _instrument(target: Target, state: str) -> None:
    """Switch callgrind's counting in the target on or off."""
    subprocess.run(
        ["callgrind_control", "-i", state, str(target.proc.pid)],
        check=True,
        capture_output=True,
        timeout=STOP_TIMEOUT * target.patience,
    )


def count(env: Env, target: Target, load: Load, requests: int) -> dict[str, Any]:
    """Run exactly `requests` GetItem requests against `target` with callgrind counting."""

    def instrument(mark: str, client: subprocess.Popen[str]) -> None:
        if mark == "START":  # the load paused: count from here, then let it go
            _instrument(target, "on")
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        else:  # every counted request has completed
            _instrument(target, "off")

    return run_loadgen(
        env,
        target,
        # Under valgrind a request takes some 50 times longer.
        [*load.args(), f"--requests={requests}", "--timeout=60"],
        limit=load.warmup + STARTUP_TIMEOUT * VALGRIND_SLOWDOWN,
        on_mark=instrument,
    )


def instructions(env: Env, name: str) -> int:
    """Instructions callgrind counted in target `name` (once the target has exited)."""
    total = 0
    for path in env.work.glob(f"{name}.callgrind*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total


def _run_callgrind(args: argparse.Namespace, env: Env, names: list[str]) -> dict[str, Any]:
    """Instructions per request of each target, one target at a time."""
    load = Load(args.warmup, args.seconds, args.concurrency, args.channels)
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        target = start(env, name)
        try:
            result = count(env, target, load, args.requests)
        finally:
            stop(target)
        done = max(1, result["requests"])
        table[name] = {
            "instructions_per_request": instructions(env, name) / done,
            "requests": result["requests"],
            "errors": result["errors"],
        }
        print(
            f"{name:<14} {table[name]['instructions_per_request']:>12,.0f} instructions/request"
            f"  ({result['requests']} requests, errors {result['errors']})",
            flush=True,
        )
    ratios = {}
    if "bare" in table:
        bare = table["bare"]["instructions_per_request"]
        for name, row in table.items():
            if name != "bare":
                ratios[name] = bare / row["instructions_per_request"]
                print(
                    f"{name}/bare: instruction ratio {ratios[name]:.3f} "
                    "(bare's instructions per request over this target's; "
                    "user space only, so the throughput ratio tends to be higher)"
                )
    return {"mode": "callgrind", "targets": table, "ratios": ratios}


# --- report ---------------------------------------------------------------------------


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rounds))


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of one target at one level."""
    return {
        "rps": _median(rounds, "rps"),
        "rps_rounds": [round(r["rps"], 1) for r in rounds],
        "p50_ms": _median(rounds, "p50_ms"),
        "p99_ms": _median(rounds, "p99_ms"),
        "server_cpu_us_per_req": _median(rounds, "server_cpu_us_per_req"),
        "postgres_cpu_us_per_req": _median(rounds, "postgres_cpu_us_per_req"),
        "machine_cores": _median(rounds, "machine_cores"),
        "failed": sum(r["failed"] for r in rounds),
    }


def report(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Print one table over every level and target; return the ratios against bare."""
    header = (
        f"{'streams':<13} {'target':<14} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'server us/req':>13} {'pg us/req':>9}  {'rps/bare':>8} {'p99/bare':>8} "
        f"{'cpu bare/x':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    ratios: dict[str, dict[str, Any]] = {}
    verdicts = []
    for level, targets in table.items():
        bare = targets.get("bare")
        for name, row in targets.items():
            line = (
                f"{level:<13} {name:<14} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} "
                f"{row['p99_ms']:>7.2f} {row['server_cpu_us_per_req']:>13.0f} "
                f"{row['postgres_cpu_us_per_req']:>9.0f}"
            )
            if bare is not None and name != "bare":
                ratio = {
                    "throughput": row["rps"] / bare["rps"],
                    "p99": row["p99_ms"] / bare["p99_ms"],
                    "cpu": bare["server_cpu_us_per_req"] / row["server_cpu_us_per_req"],
                }
                ratios.setdefault(level, {})[name] = ratio
                line += f"  {ratio['throughput']:>8.3f} {ratio['p99']:>8.2f} {ratio['cpu']:>10.3f}"
                if name == "service":
                    verdicts.append(
                        ratio["throughput"] >= GOAL_THROUGHPUT and ratio["p99"] <= GOAL_P99
                    )
            print(line)
        lean, service = targets.get("bare-no-reset"), targets.get("service")
        if lean is not None and service is not None:
            own = service["rps"] / lean["rps"]
            ratios[level]["service/bare-no-reset"] = {"throughput": own}
            print(f"{'':<13} service/bare-no-reset: throughput {own:.3f} (the template's own path)")
    print(
        f"goal: service throughput >= {GOAL_THROUGHPUT} x bare and p99 <= {GOAL_P99} x bare "
        f"at every level: {'met' if verdicts and all(verdicts) else 'NOT met'}"
    )
    busy = max(row["machine_cores"] for targets in table.values() for row in targets.values())
    print(
        f"(the whole machine kept up to {busy:.2f} of {os.cpu_count()} cores busy: server, "
        "PostgreSQL, h2load and anything else)"
    )
    return ratios


REFUSED = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


def _check_codes(target: Target, expected: int) -> dict[str, int]:
    """Status codes in the service's request log: OK, as many as h2load saw.

    CANCELLED is expected: h2load resets the streams still in flight when a run ends.
    Refusals (UNAVAILABLE, RESOURCE_EXHAUSTED: load shedding on a machine busier than
    the service expects) are reported, not errors: h2load and wrk count them as
    answered, so they are part of `expected`.
    """
    codes: dict[str, int] = {}
    for line in target.log.read_text(errors="replace").splitlines():
        if '"msg":"request"' in line:
            code = json.loads(line)["code"]
            codes[code] = codes.get(code, 0) + 1
    bad = {code: n for code, n in codes.items() if code not in {"OK", "CANCELLED", *REFUSED}}
    if bad:
        raise RuntimeError(f"{target.name} answered calls with {bad}")
    answered = codes.get("OK", 0) + sum(codes.get(code, 0) for code in REFUSED)
    if answered < expected:
        raise RuntimeError(
            f"{target.name} logged {answered} calls, the load generator saw {expected}"
        )
    refused = {code: codes[code] for code in REFUSED if code in codes}
    if refused:
        print(f"{target.name} refused {refused} of {answered} calls (shedding or limits)")
    return codes


def _run_throughput(args: argparse.Namespace, env: Env, names: list[str]) -> dict[str, Any]:
    """Every level, targets side by side in alternating rounds."""
    env.payload = env.work / "getitem.bin"
    env.payload.write_bytes(h2load.grpc_frame(env.request))
    levels = [LEVELS[level] for level in args.levels]
    targets: dict[str, Target] = {}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    runs = []
    served = dict.fromkeys(names, 0)
    try:
        for name in names:
            targets[name] = start(env, name)
            check_call(env, targets[name])
        for level in levels:
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for round_no in range(args.rounds):
                order = names if round_no % 2 == 0 else names[::-1]
                for name in order:
                    result = measure(env, targets[name], level, args) | {"round": round_no + 1}
                    rounds[name].append(result)
                    runs.append(result)
                    served[name] += result["requests"]
                    print(
                        f"streams {level!s:<13} round {round_no + 1}/{args.rounds} {name:<14} "
                        f"{result['rps']:8.0f} rps  p50 {result['p50_ms']:.2f} ms  "
                        f"p99 {result['p99_ms']:.2f} ms  "
                        f"server {result['server_cpu_us_per_req']:.0f} us/req "
                        f"({result['server_system_us_per_req']:.0f} system)  "
                        f"failed {result['failed']}",
                        flush=True,
                    )
            table[str(level)] = {name: summarize(rows) for name, rows in rounds.items()}
    finally:
        for target in targets.values():
            stop(target)
    codes = {
        name: _check_codes(target, served[name])
        for name, target in targets.items()
        if name == "service"
    }
    return {"targets": table, "ratios": report(table), "codes": codes, "runs": runs}


# --- the gateway scenario -------------------------------------------------------------

# The measured paths of `--scenario gateway`: GetItem over the gateway (wrk), over
# the same service's gRPC port (h2load), a bare HTTP endpoint (wrk), and that endpoint
# doing the work every gateway request must do (wrk; bench/bare_http.py says which).
GATEWAY_PATHS = ("bare-http", "required-http", "gateway", "service-grpc")


def _check_http(target: Target, item_id: str) -> None:
    """One real HTTP GetItem: 200 and the right item."""
    url = f"http://127.0.0.1:{target.http_port}/v1/items/{item_id}"
    with urllib.request.urlopen(url, timeout=10) as response:
        answered = json.loads(response.read())["id"]
    if answered != item_id:
        raise RuntimeError(f"{target.name} answered item {answered!r}, expected {item_id!r}")


def _run_gateway(args: argparse.Namespace, env: Env) -> dict[str, Any]:
    """The gateway against the bare HTTP endpoint and the service's own gRPC, alternating."""
    env.payload = env.work / "getitem.bin"
    env.payload.write_bytes(h2load.grpc_frame(env.request))
    wrk.ensure_installed()
    levels = [LEVELS[level] for level in args.levels]
    bare = start_bare_http(env)
    required: Target | None = None
    service: Target | None = None
    table: dict[str, dict[str, dict[str, Any]]] = {}
    runs = []
    served = 0
    try:
        required = start_bare_http(env, "required-http", required_work=True)
        service = start_service(env, "service", level="INFO")
        _check_http(bare, env.item_id)
        _check_http(required, env.item_id)
        _check_http(service, env.item_id)
        check_call(env, service)

        def one(name: str, level: h2load.Level) -> dict[str, Any]:
            assert service is not None
            assert required is not None
            if name == "bare-http":
                return measure_http(env, bare, level, args, name)
            if name == "required-http":
                return measure_http(env, required, level, args, name)
            if name == "gateway":
                return measure_http(env, service, level, args, name)
            return measure(env, service, level, args) | {"target": name}

        for level in levels:
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in GATEWAY_PATHS}
            for round_no in range(args.rounds):
                order = GATEWAY_PATHS if round_no % 2 == 0 else GATEWAY_PATHS[::-1]
                for name in order:
                    result = one(name, level) | {"round": round_no + 1}
                    rounds[name].append(result)
                    runs.append(result)
                    served += result["requests"] if name in {"gateway", "service-grpc"} else 0
                    print(
                        f"connections/streams {level!s:<13} round {round_no + 1}/{args.rounds} "
                        f"{name:<13} {result['rps']:8.0f} rps  p50 {result['p50_ms']:.2f} ms  "
                        f"p99 {result['p99_ms']:.2f} ms  "
                        f"server {result['server_cpu_us_per_req']:.0f} us/req  "
                        f"failed {result['failed']}",
                        flush=True,
                    )
            table[str(level)] = {name: summarize(rows) for name, rows in rounds.items()}
    finally:
        stop(bare)
        if required is not None:
            stop(required)
        if service is not None:
            stop(service)
    codes = {"service": _check_codes(service, served)} if service is not None else {}
    return {"targets": table, "ratios": _report_gateway(table), "codes": codes, "runs": runs}


def _report_gateway(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    header = (
        f"{'concurrency':<13} {'path':<13} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'server us/req':>13}  {'rps/bare-http':>13}"
    )
    print()
    print(header)
    print("-" * len(header))
    ratios: dict[str, dict[str, float]] = {}
    verdicts = []
    for level, paths in table.items():
        bare = paths["bare-http"]
        for name, row in paths.items():
            ratio = row["rps"] / bare["rps"]
            print(
                f"{level:<13} {name:<13} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} "
                f"{row['p99_ms']:>7.2f} {row['server_cpu_us_per_req']:>13.0f}  {ratio:>13.3f}"
            )
            ratios.setdefault(level, {})[f"{name}/bare-http"] = ratio
        own = paths["gateway"]["rps"] / paths["required-http"]["rps"]
        ratios[level]["gateway/required-http"] = own
        print(f"{'':<13} gateway/required-http: throughput {own:.3f} (the design's own cost)")
        verdicts.append(ratios[level]["gateway/bare-http"] >= GOAL_GATEWAY)
    print(
        f"goal: gateway throughput >= {GOAL_GATEWAY} x the bare HTTP endpoint at every level: "
        f"{'met' if verdicts and all(verdicts) else 'NOT met'}"
    )
    print(
        "(required-http/bare-http is the most any gateway doing the work the issue requires "
        "can reach)"
    )
    return ratios


# --- main -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured load before it")
    parser.add_argument("--rounds", type=int, default=3, help="runs per target, alternating")
    parser.add_argument(
        "--levels",
        type=lambda text: [level.strip() for level in text.split(",") if level.strip()],
        default=list(LEVELS),
        help=f"comma-separated concurrency levels, of {','.join(LEVELS)}",
    )
    parser.add_argument(
        "--scenario",
        choices=("path", "overload", "observability", "gateway", "cache"),
        default="path",
        help="path: the request path's cost against bare servers (default); overload: "
        "goodput under 3x the capacity, with load shedding on and off (bench/overload.py); "
        "observability: metrics and 10%% tracing on against both off (bench/observability.py); "
        "gateway: GetItem over the gateway against a bare uvicorn endpoint (wrk) and the "
        "service's gRPC; cache: GetItem on a cache hit and a miss against a bare server "
        "reading Redis (bench/cache.py)",
    )
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="cache: the Redis server's URL"
    )
    parser.add_argument(
        "--factor", type=float, default=3.0, help="overload: offered load over capacity"
    )
    parser.add_argument("--connections", type=int, default=300, help="overload: client connections")
    parser.add_argument("--streams", type=int, default=4, help="overload: streams each")
    parser.add_argument(
        "--grpc-timeout",
        default="",
        help="a grpc-timeout header to send (e.g. 2S); none by default, so the service "
        "applies its own default deadline",
    )
    parser.add_argument(
        "--targets",
        default="bare,service",
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="requests in flight (--callgrind)"
    )
    parser.add_argument("--channels", type=int, default=4, help="client connections (--callgrind)")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432",
        help="PostgreSQL server (DSN without a database)",
    )
    parser.add_argument(
        "--project",
        type=Path,
        help="an already rendered and `uv sync`ed default project (skips rendering)",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions per request under valgrind instead of measuring throughput",
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="requests counted per target (--callgrind)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    return parser


def _prepare(project: Path | None, work: Path, support: ModuleType) -> Path:
    if project is not None:
        return project.resolve()
    project = work / "project"
    started = time.monotonic()
    support.render(project)
    support.uv_sync(project)
    print(f"rendered and installed the default project in {time.monotonic() - started:.1f} s")
    return project


def _check_args(args: argparse.Namespace, names: list[str]) -> None:
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise SystemExit(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    bad_levels = sorted(set(args.levels) - set(LEVELS))
    if bad_levels or not args.levels:
        raise SystemExit(f"unknown levels {bad_levels}; choose from {', '.join(LEVELS)}")
    if args.callgrind:
        missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
        if missing:
            raise SystemExit(
                f"--callgrind needs {' and '.join(missing)} (Debian: apt install valgrind)"
            )
    else:
        h2load.ensure_installed()


def _scenario(args: argparse.Namespace, env: Env, names: list[str]) -> tuple[dict[str, Any], int]:
    """The chosen measurement's summary and its count of failed calls."""
    if args.callgrind:
        summary = _run_callgrind(args, env, names)
        return summary, sum(row["errors"] for row in summary["targets"].values())
    if args.scenario == "cache":
        summary = cache.run(
            args,
            env,
            cache.Helpers(
                start_service=start_service,
                start_process=start_script,
                stop=stop,
                measure=measure,
                summarize=summarize,
                project_python=_project_python,
                insert_item=lambda dsn: asyncio.run(_insert_item(dsn)),
                encoded_request=_encoded_request,
                check_call=check_call,
            ),
            package=PACKAGE,
            levels=[LEVELS[level] for level in args.levels],
        )
        return summary, summary["errors"]
    if args.scenario == "gateway":
        summary = _run_gateway(args, env)
    elif args.scenario == "path":
        summary = _run_throughput(args, env, names)
    else:
        env.payload = env.work / "getitem.bin"
        env.payload.write_bytes(h2load.grpc_frame(env.request))
        if args.scenario == "overload":
            start = functools.partial(start_service, backlog=None)  # as shipped
            summary = overload.run(args, env, start=start, stop=stop)
        else:
            summary = observability.run(
                args,
                env,
                start_service=start_service,
                stop=stop,
                measure=measure,
                summarize=summarize,
                levels=[LEVELS[level] for level in args.levels],
            )
        return summary, summary["errors"]
    failed = sum(row["failed"] for level in summary["targets"].values() for row in level.values())
    return summary, failed


def _run(args: argparse.Namespace, work: Path) -> int:
    support = _support()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    _check_args(args, names)
    project = _prepare(args.project, work, support)
    with database(args.postgres) as (db_name, dsn):
        env = Env(project, work, dsn, db_name, support, callgrind=args.callgrind)
        support.run([env.bin(SLUG), "migrate"], work, DATABASE_URL=dsn)
        env.item_id = asyncio.run(_insert_item(dsn))
        env.request = _encoded_request(env)
        summary, errors = _scenario(args, env, names)
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "goal": {"throughput": GOAL_THROUGHPUT, "p99": GOAL_P99},
        **summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.output}")
    if errors:
        print(f"FAILED: {errors} RPC(s) failed", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    """Entry point."""
    args = _parser().parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpc-template-bench-"))
    try:
        return _run(args, work)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
