"""Benchmark: GetItem throughput and latency, generated service vs a bare grpc.aio server.

Renders the template with default answers, installs it, migrates a fresh PostgreSQL
database and stores one item. Then it starts, as separate processes on 127.0.0.1:

- `bare`: bench/bare_server.py, GetItem only, same query and asyncpg pool size;
- `service`: the generated service (`<slug> serve`), default INFO JSON logs to a file;
- `service-quiet`: the same with LOG__LEVEL=WARNING (no per-request log line);

and measures each with one closed-loop client process (bench/loadgen.py) at a fixed
concurrency, targets alternating within every round (order reversed on odd rounds)
so drift on a shared machine hits all of them alike. Per target it reports the
median over rounds of throughput and p50/p99 latency, and CPU time per request of
the server process, of the PostgreSQL backends and of the client, measured over the
same window. CPU per request is the steadier figure on a busy machine: throughput
moves with whatever else runs on the cores.

The goal is service/bare throughput >= 0.85. A benchmark is not a timed assertion:
the exit status is non-zero only on errors (a failed RPC, a process that would not
start), never on the ratio. Results go to .bench/results.json.

`--callgrind` measures instead the instructions each server executes per request,
under valgrind's callgrind, counting only while exactly `--requests` requests run.
That count does not depend on what else the machine does: the same code gives the
same figure within about 1%, so it shows changes of a few percent that throughput
on a shared machine hides. It counts user-space instructions only, not system calls
or waiting, so it is a guide to the throughput ratio, not a substitute.

    nox -s bench -- --seconds 3 --rounds 1      # a quick look
    nox -s bench                                # the default: 10 s x 3 rounds
    nox -s bench -- --callgrind                 # instructions per request (needs valgrind)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import asyncpg
import psutil

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = ROOT / ".bench" / "results.json"
GOAL = 0.85
TARGETS = ("bare", "service", "service-quiet")
PACKAGE = "acme_items"  # package_name of the default answers
SLUG = "acme-items"
# The service's pool defaults (settings.DatabaseSettings); the bare server uses the same.
POOL_MIN, POOL_MAX = 2, 10
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# Under valgrind a server starts and stops some 50 times slower.
VALGRIND_SLOWDOWN = 10.0
CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no")
# Above this many cores used by other processes, the machine was not quiet.
BUSY_CORES = 0.25
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


def start_service(env: Env, name: str, *, level: str) -> Target:
    """The generated service as a process, JSON logs at `level` to a file; waits for /readyz."""
    grpc_port, admin_port, http_port = (env.support.free_port() for _ in range(3))
    variables = env.support.tool_env(
        DATABASE_URL=env.dsn,
        GRPC_PORT=str(grpc_port),
        ADMIN_PORT=str(admin_port),
        HTTP_PORT=str(http_port),
        GRPC__HOST="127.0.0.1",
        ADMIN__HOST="127.0.0.1",
        LOG__FORMAT="json",
        LOG__LEVEL=level,
        # Teardown speed only; draining is not what is measured.
        SHUTDOWN__DRAIN="0",
    )
    log = env.work / f"{name}.log"
    command = env.server_command(name, [env.bin(SLUG), "serve"])
    proc = _spawn(command, variables, log, env.work)
    target = Target(name, grpc_port, proc, log, env.patience)
    _wait_until(target, lambda: _readyz(admin_port), "ready (/readyz 200)")
    return target


def start_bare(env: Env) -> Target:
    """bench/bare_server.py in the project's environment; waits for its READY line."""
    port = env.support.free_port()
    args = [
        str(BENCH / "bare_server.py"),
        f"--package={PACKAGE}",
        f"--dsn={env.dsn}",
        f"--port={port}",
        f"--min-size={POOL_MIN}",
        f"--max-size={POOL_MAX}",
    ]
    log = env.work / "bare.log"
    proc = _spawn(env.server_command("bare", args), env.support.tool_env(), log, env.work)
    target = Target("bare", port, proc, log, env.patience)
    _wait_until(target, lambda: "READY" in _tail(log), "ready (READY line)")
    return target


def start(env: Env, name: str) -> Target:
    """Start the target called `name` (one of TARGETS)."""
    if name == "bare":
        return start_bare(env)
    return start_service(env, name, level="WARNING" if name == "service-quiet" else "INFO")


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
    server_switches: int
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
    with server.oneshot():
        times = server.cpu_times()
        switches = server.num_ctx_switches()
    return Snapshot(
        server_user=times.user,
        server_system=times.system,
        server_switches=switches.voluntary + switches.involuntary,
        postgres=_postgres_backends(db_name),
        busy=sum(system) - idle,
    )


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


def measure(env: Env, target: Target, load: Load) -> dict[str, Any]:
    """One measured window against `target`."""
    server = target.process
    snaps: dict[str, Snapshot] = {}

    def sample(mark: str, _: subprocess.Popen[str]) -> None:
        snaps[mark] = snapshot(server, env.db_name)

    result = run_loadgen(
        env,
        target,
        [*load.args(), f"--seconds={load.seconds}"],
        limit=load.warmup + load.seconds + STARTUP_TIMEOUT,
        on_mark=sample,
    )
    start, end = snaps["START"], snaps["END"]
    requests = max(1, result["requests"])
    postgres = sum(cpu - start.postgres.get(pid, 0.0) for pid, cpu in end.postgres.items())
    server_user = end.server_user - start.server_user
    server_system = end.server_system - start.server_system
    server_cpu = server_user + server_system
    busy = end.busy - start.busy
    elapsed = result["elapsed_s"]
    result |= {
        "target": target.name,
        "server_cpu_us_per_req": server_cpu / requests * US,
        "server_system_us_per_req": server_system / requests * US,
        "server_switches_per_req": (end.server_switches - start.server_switches) / requests,
        "postgres_cpu_us_per_req": postgres / requests * US,
        "client_cpu_us_per_req": result["client_cpu_s"] / requests * US,
        "server_cores": server_cpu / elapsed,
        # Cores busy with anything but this server, its database backends and the client.
        "other_cores": max(0.0, busy - server_cpu - postgres - result["client_cpu_s"]) / elapsed,
    }
    return result


# --- instruction counts (callgrind) ---------------------------------------------------


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


@dataclass
class Summary:
    """Medians over rounds of one target."""

    rounds: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        """Median over rounds of a top-level or `latency_ms.` key."""
        if key.startswith("latency_ms."):
            values = [r["latency_ms"][key.split(".", 1)[1]] for r in self.rounds]
        else:
            values = [r[key] for r in self.rounds]
        return float(statistics.median(values))

    def as_dict(self) -> dict[str, Any]:
        """The summary as stored in results.json."""
        return {
            "rps": self.median("rps"),
            "rps_rounds": [round(r["rps"], 1) for r in self.rounds],
            "p50_ms": self.median("latency_ms.p50"),
            "p99_ms": self.median("latency_ms.p99"),
            "server_cpu_us_per_req": self.median("server_cpu_us_per_req"),
            "server_system_us_per_req": self.median("server_system_us_per_req"),
            "server_switches_per_req": self.median("server_switches_per_req"),
            "postgres_cpu_us_per_req": self.median("postgres_cpu_us_per_req"),
            "client_cpu_us_per_req": self.median("client_cpu_us_per_req"),
            "other_cores": self.median("other_cores"),
            "errors": sum(r["errors"] for r in self.rounds),
        }


def _ratios(summaries: dict[str, Summary], table: dict[str, Any]) -> dict[str, Any]:
    """Each target against `bare`: throughput ratios and the inverse server CPU ratio."""
    if "bare" not in table:
        return {}
    bare = table["bare"]
    ratios = {}
    for name, row in table.items():
        if name == "bare":
            continue
        per_round = [
            s["rps"] / b["rps"]
            for s, b in zip(summaries[name].rounds, summaries["bare"].rounds, strict=True)
        ]
        ratios[name] = {
            "throughput": row["rps"] / bare["rps"],
            "throughput_round_median": statistics.median(per_round),
            "throughput_per_round": [round(r, 3) for r in per_round],
            # A CPU-bound server's throughput is the inverse of its CPU per request.
            "cpu_based": bare["server_cpu_us_per_req"] / row["server_cpu_us_per_req"],
        }
    return ratios


def report(summaries: dict[str, Summary], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and return the summary for results.json."""
    table = {name: s.as_dict() for name, s in summaries.items()}
    header = (
        f"{'target':<14} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'server us/req':>13} {'pg us/req':>9} {'client us/req':>13} {'other cores':>11} "
        f"{'errors':>6}  rps per round"
    )
    print()
    print(
        f"GetItem, concurrency {args.concurrency} over {args.channels} channels, "
        f"{args.rounds} round(s) of {args.seconds:g} s after {args.warmup:g} s warm-up; "
        "medians over rounds"
    )
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        print(
            f"{name:<14} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
            f"{row['server_cpu_us_per_req']:>13.0f} {row['postgres_cpu_us_per_req']:>9.0f} "
            f"{row['client_cpu_us_per_req']:>13.0f} {row['other_cores']:>11.2f} "
            f"{row['errors']:>6}  {row['rps_rounds']}"
        )
    ratios = _ratios(summaries, table)
    for name, ratio in ratios.items():
        cpu, bare_cpu = (table[t]["server_cpu_us_per_req"] for t in (name, "bare"))
        print(
            f"{name}/bare: throughput {ratio['throughput']:.3f} "
            f"(median of per-round ratios {ratio['throughput_round_median']:.3f}, "
            f"rounds {ratio['throughput_per_round']}); CPU-based {ratio['cpu_based']:.3f} "
            f"(server CPU per request {cpu:.0f} vs {bare_cpu:.0f} us)"
        )
    if "service" in ratios:
        ratio = ratios["service"]["throughput"]
        verdict = "met" if ratio >= GOAL else "NOT met"
        print(f"goal service/bare throughput >= {GOAL}: {verdict} ({ratio:.3f})")
    busy = max(row["other_cores"] for row in table.values())
    if busy > BUSY_CORES:
        print(
            f"note: other processes kept up to {busy:.2f} cores busy during the measurements; "
            "throughput figures are disturbed, the CPU-based ratio less so"
        )
    return {"targets": table, "ratios": ratios}


def _log_stats(targets: dict[str, Target]) -> dict[str, Any]:
    stats = {}
    for name, target in targets.items():
        if name.startswith("service"):
            data = target.log.read_bytes()
            lines = data.count(b"\n")
            stats[name] = {"lines": lines, "bytes": len(data)}
    return stats


# --- main -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured load before it")
    parser.add_argument("--rounds", type=int, default=3, help="runs per target, alternating")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--channels", type=int, default=4, help="client connections")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
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


def _run_throughput(args: argparse.Namespace, env: Env, names: list[str]) -> dict[str, Any]:
    """Throughput and latency of all targets, running side by side, in alternating rounds."""
    load = Load(args.warmup, args.seconds, args.concurrency, args.channels)
    targets: dict[str, Target] = {}
    try:
        for name in names:
            targets[name] = start(env, name)
        summaries = {name: Summary() for name in names}
        for round_no in range(args.rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                result = measure(env, targets[name], load) | {"round": round_no + 1}
                summaries[name].rounds.append(result)
                print(
                    f"round {round_no + 1}/{args.rounds} {name:<14} "
                    f"{result['rps']:8.0f} rps  p50 {result['latency_ms']['p50']:.2f} ms  "
                    f"p99 {result['latency_ms']['p99']:.2f} ms  "
                    f"server {result['server_cpu_us_per_req']:.0f} us/req  "
                    f"errors {result['errors']}",
                    flush=True,
                )
    finally:
        for target in targets.values():
            stop(target)
    return {
        **report(summaries, args),
        "service_logs": _log_stats(targets),
        "runs": [r for s in summaries.values() for r in s.rounds],
    }


def _run(args: argparse.Namespace, work: Path) -> int:
    support = _support()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise SystemExit(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    if args.callgrind:
        missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
        if missing:
            raise SystemExit(
                f"--callgrind needs {' and '.join(missing)} (Debian: apt install valgrind)"
            )
    project = _prepare(args.project, work, support)
    with database(args.postgres) as (db_name, dsn):
        env = Env(project, work, dsn, db_name, support, callgrind=args.callgrind)
        support.run([env.bin(SLUG), "migrate"], work, DATABASE_URL=dsn)
        env.item_id = asyncio.run(_insert_item(dsn))
        if args.callgrind:
            summary = _run_callgrind(args, env, names)
        else:
            summary = _run_throughput(args, env, names)
    errors = sum(row["errors"] for row in summary["targets"].values())
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "goal": {"service_over_bare_throughput": GOAL},
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
