"""Overload benchmark: goodput of GetItem at three times the capacity, shedding on and off.

For each target (`shed`: the service as shipped; `queue`: the same with
SHEDDING__ENABLED=false and grpc core's backlog at its default):

1. capacity C: the OK answers per second of a closed-loop run (h2load, 4x8 streams,
   `grpc-timeout: 250m`);
2. overload: an open-loop run offering `--factor` x C requests per second for
   `--seconds` over hundreds of connections with a few streams each, every request
   with a 250 ms deadline;
3. recovery: a closed-loop run right after the overload; its OK rate against C.

h2load cannot read gRPC's status trailers, so the figures come from the service's own
request log, one line per request the service started (code and duration): goodput is
its OK lines per second, their p99 the latency of the OK answers as the service
measured it (an answer that made it in time; grpc enforces the client's deadline).
Requests refused before they started (load shedding, grpc core's backlog) have no
line: they are h2load's responses minus the lines. Also reported: the service's RSS
before and after, and at normal load (32 streams) the throughput with every
mechanism on (rate limiting at a limit it never reaches, shedding) against none.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2load
import psutil

SERVICE = "acme.items.v1.ItemService"
DEADLINE = "250m"
CLOSED = h2load.Level(4, 8)
GOAL_GOODPUT = 0.9
GOAL_RSS = 0.10
GOAL_RECOVERY_S = 2.0
GOAL_CHAIN = 0.95

# Targets: the environment each runs with.
TARGETS: dict[str, dict[str, str]] = {
    "shed": {},
    "queue": {
        "SHEDDING__ENABLED": "false",
        # grpc core's own default backlog (1000 pending calls, hard limit 3000).
        "GRPC__MAX_PENDING_CALLS": "1000",
    },
}
# The cost of a refusal: every call refused by the chain (a rate limit it cannot meet),
# against every call served.
COST_TARGETS: dict[str, dict[str, str]] = {
    "served": {},
    "refused": {"RATE_LIMIT__PER_SECOND": "0.001", "RATE_LIMIT__BURST": "1"},
}
# Every mechanism on at normal load, and none.
CHAIN_TARGETS: dict[str, dict[str, str]] = {
    "all-on": {"RATE_LIMIT__PER_SECOND": "100000", "RATE_LIMIT__BURST": "100000"},
    "all-off": {"SHEDDING__ENABLED": "false"},
}


@dataclass
class Lines:
    """The service's request lines from a byte offset of its log on."""

    codes: dict[str, int]
    ok_ms: list[float]

    @classmethod
    def read(cls, log: Path, offset: int) -> tuple[Lines, int]:
        """Parse the lines written since `offset`; returns them and the new offset."""
        data = log.read_bytes()
        codes: dict[str, int] = {}
        ok_ms: list[float] = []
        for raw in data[offset:].splitlines():
            if b'"msg":"request"' not in raw:
                continue
            entry = json.loads(raw)
            codes[entry["code"]] = codes.get(entry["code"], 0) + 1
            if entry["code"] == "OK":
                ok_ms.append(entry["duration_ms"])
        return cls(codes, ok_ms), len(data)

    def p99(self) -> float:
        """99th percentile of the OK answers' durations, ms (nan without any)."""
        if not self.ok_ms:
            return float("nan")
        ordered = sorted(self.ok_ms)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _settle(log: Path, seconds: float = 1.0) -> None:
    """Let the service write out its queued request lines (flushed every 0.05 s)."""
    del log
    time.sleep(seconds)


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _run_level(env: Any, target: Any, level: h2load.Level, seconds: float, **kw: Any) -> Any:
    url = f"http://127.0.0.1:{target.port}/{SERVICE}/GetItem"
    headers = (f"grpc-timeout: {DEADLINE}",)
    return h2load.run(url, env.payload, level, seconds, headers=headers, **kw)


def measure_target(env: Any, args: Any, name: str, target: Any) -> dict[str, Any]:
    """Capacity, overload and recovery of one running target."""
    offset = 0
    _run_level(env, target, CLOSED, 2)  # warm-up
    _settle(target.log)
    _, offset = Lines.read(target.log, offset)
    capacity_run = _run_level(env, target, CLOSED, args.seconds)
    _settle(target.log)
    lines, offset = Lines.read(target.log, offset)
    capacity = lines.codes.get("OK", 0) / capacity_run.seconds
    rss_before = _rss(target.proc.pid)
    clients = args.connections
    per_client = max(1, round(args.factor * capacity / clients))
    level = h2load.Level(clients, args.streams)
    overload = _run_level(env, target, level, args.seconds, rps=per_client)
    recovery = _run_level(env, target, CLOSED, 2)
    rss_after = _rss(target.proc.pid)
    _settle(target.log)
    lines, offset = Lines.read(target.log, offset)
    # The lines of the overload and of the recovery run, told apart by time is not
    # possible from the log alone; the recovery run is short and closed-loop, so its
    # OK answers are taken from h2load (every response of a closed-loop run at this
    # level is an answer the service started).
    recovery_rate = recovery.succeeded / recovery.seconds
    ok = lines.codes.get("OK", 0) - recovery.succeeded
    offered = per_client * clients
    return {
        "target": name,
        "capacity_ok_per_s": capacity,
        "offered_per_s": offered,
        "offered_over_capacity": offered / capacity if capacity else float("nan"),
        "overload_responses": overload.succeeded,
        "goodput_ok_per_s": ok / overload.seconds,
        "goodput_over_capacity": ok / overload.seconds / capacity if capacity else float("nan"),
        "started_codes": lines.codes,
        "refused_before_start": max(
            0, overload.succeeded + recovery.succeeded - sum(lines.codes.values())
        ),
        "ok_p99_ms": lines.p99(),
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
        "rss_growth": (rss_after - rss_before) / rss_before,
        "recovery_over_capacity": recovery_rate / capacity if capacity else float("nan"),
    }


def chain_cost(
    env: Any, args: Any, start: Callable[..., Any], stop: Callable[[Any], None]
) -> dict[str, Any]:
    """Throughput at normal load with every mechanism on against none, alternating."""
    targets = {
        name: start(env, name, level="INFO", settings=settings)
        for name, settings in CHAIN_TARGETS.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for round_no in range(args.rounds):
            order = list(targets) if round_no % 2 == 0 else list(targets)[::-1]
            for name in order:
                url = f"http://127.0.0.1:{targets[name].port}/{SERVICE}/GetItem"
                h2load.run(url, env.payload, CLOSED, 1)
                result = h2load.run(url, env.payload, CLOSED, args.seconds)
                rates[name].append(result.rps)
    finally:
        for target in targets.values():
            stop(target)
    on, off = (statistics.median(rates[name]) for name in ("all-on", "all-off"))
    return {"all_on_rps": on, "all_off_rps": off, "ratio": on / off, "rounds": rates}


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rejection_cost(
    env: Any, args: Any, start: Callable[..., Any], stop: Callable[[Any], None]
) -> dict[str, Any]:
    """Server CPU per call refused by the chain against per call served, and the ceiling.

    With a served call costing s and a refusal r of one core, a process offered F
    times its capacity C = 1/s serves at most x with x s + (F C - x) r = 1, that is
    x / C = (1 - F r/s) / (1 - r/s). grpc core's own refusals (its backlog) cost
    less than the chain's, so the ceiling is a floor of what the mix could reach.
    """
    targets = {
        name: start(env, name, level="INFO", settings=settings)
        for name, settings in COST_TARGETS.items()
    }
    per_call: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for round_no in range(args.rounds):
            order = list(targets) if round_no % 2 == 0 else list(targets)[::-1]
            for name in order:
                target = targets[name]
                _run_level(env, target, CLOSED, 1)
                before = _cpu_seconds(target.proc.pid)
                result = _run_level(env, target, CLOSED, args.seconds)
                _settle(target.log, 0.2)
                used = _cpu_seconds(target.proc.pid) - before
                per_call[name].append(used / max(result.succeeded, 1) * 1e6)
    finally:
        for target in targets.values():
            stop(target)
    served, refused = (statistics.median(per_call[name]) for name in ("served", "refused"))
    ratio = refused / served
    factor = args.factor
    ceiling = (1 - factor * ratio) / (1 - ratio) if ratio < 1 else 0.0
    return {
        "served_cpu_us": served,
        "refused_cpu_us": refused,
        "refused_over_served": ratio,
        "ceiling_over_capacity": max(ceiling, 0.0),
        "rounds": per_call,
    }


def run(
    args: Any, env: Any, *, start: Callable[..., Any], stop: Callable[[Any], None]
) -> dict[str, Any]:
    """The overload scenario; prints its table and returns the results."""
    results = {}
    for name, settings in TARGETS.items():
        target = start(env, name, level="INFO", settings=settings)
        try:
            results[name] = measure_target(env, args, name, target)
        finally:
            stop(target)
        row = results[name]
        print(
            f"{name:<6} capacity {row['capacity_ok_per_s']:7.0f} OK/s  offered "
            f"{row['offered_per_s']:6.0f}/s ({row['offered_over_capacity']:.1f}x)  goodput "
            f"{row['goodput_ok_per_s']:6.0f} OK/s ({row['goodput_over_capacity']:.2f} C)  "
            f"OK p99 {row['ok_p99_ms']:6.1f} ms  RSS {row['rss_before_mb']:.0f} -> "
            f"{row['rss_after_mb']:.0f} MB ({row['rss_growth']:+.1%})  recovery "
            f"{row['recovery_over_capacity']:.2f} C  started {row['started_codes']}  "
            f"refused before start {row['refused_before_start']}",
            flush=True,
        )
    chain = chain_cost(env, args, start, stop)
    print(
        f"normal load, every mechanism on / none: {chain['ratio']:.3f} "
        f"({chain['all_on_rps']:.0f} / {chain['all_off_rps']:.0f} rps; goal >= {GOAL_CHAIN})"
    )
    cost = rejection_cost(env, args, start, stop)
    print(
        f"a refusal by the chain costs {cost['refused_cpu_us']:.0f} us of CPU, a served call "
        f"{cost['served_cpu_us']:.0f} us ({cost['refused_over_served']:.2f}): at "
        f"{args.factor:g}x capacity, refusing every excess call in the chain caps goodput at "
        f"{cost['ceiling_over_capacity']:.2f} C (grpc core's cheaper refusals raise it)"
    )
    shed = results["shed"]
    verdicts = {
        "goodput": shed["goodput_over_capacity"] >= GOAL_GOODPUT,
        "p99_under_deadline": shed["ok_p99_ms"] < 250,
        "rss_growth": shed["rss_growth"] < GOAL_RSS,
        "recovery": shed["recovery_over_capacity"] >= GOAL_GOODPUT,
        "chain": chain["ratio"] >= GOAL_CHAIN,
    }
    print(f"goals (shedding on): {verdicts}")
    return {
        "targets": results,
        "chain": chain,
        "rejection": cost,
        "verdicts": verdicts,
        "errors": 0,
    }
