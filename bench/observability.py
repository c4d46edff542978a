"""Observability benchmark: GetItem throughput with metrics and tracing on, against both off.

Two copies of the generated service, as shipped (JSON request lines at INFO), side by
side in alternating rounds at each concurrency level (h2load):

- `plain`: METRICS__ENABLED=false and no OTLP endpoint (no tracing);
- `observed`: metrics on, tracing on at TRACING__SAMPLE_RATIO=0.1, exporting over
  OTLP/HTTP to a local receiver (the generated project's tests/lifecycle/otlp.py, its
  own process) with the SDK's default batch settings.

Reported: per level the median throughput and p99 of each and the ratio observed/plain
(goal: at least 0.9), the resident memory of each once started and idle, and the spans
the receiver got (about a tenth of the requests when sampling works).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import h2load
import psutil

GOAL_THROUGHPUT = 0.9
SAMPLE_RATIO = "0.1"
TARGETS: dict[str, dict[str, str]] = {
    "plain": {"METRICS__ENABLED": "false"},
    "observed": {"TRACING__SAMPLE_RATIO": SAMPLE_RATIO},
}
IDLE_SETTLE_S = 3.0


def receiver(env: Any) -> tuple[subprocess.Popen[str], int]:
    """The OTLP receiver as a process of the project's Python; its port."""
    script = env.project / "tests" / "lifecycle" / "otlp.py"
    proc = subprocess.Popen(
        [env.bin("python"), str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env.support.tool_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if line[:1] != ["port"]:
        proc.kill()
        raise RuntimeError(f"the OTLP receiver did not start: {line}")
    return proc, int(line[1])


def _stop_receiver(proc: subprocess.Popen[str]) -> int:
    """Stop the receiver; the spans it got."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    for line in out.splitlines():
        if line.startswith("spans "):
            return int(line.split()[1])
    raise RuntimeError(f"the OTLP receiver reported no count: {out!r}")


def run(  # noqa: PLR0913 - the benchmark's own helpers, passed in to avoid an import cycle
    args: Any,
    env: Any,
    *,
    start_service: Callable[..., Any],
    stop: Callable[[Any], None],
    measure: Callable[..., dict[str, Any]],
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
    levels: list[h2load.Level],
) -> dict[str, Any]:
    """Both targets at every level; the ratios, idle RSS and spans exported."""
    receiver_proc, port = receiver(env)
    targets: dict[str, Any] = {}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    served = 0
    try:
        for name, settings in TARGETS.items():
            extra = dict(settings)
            if name == "observed":
                extra["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
            targets[name] = start_service(env, name, level="INFO", settings=extra)
        time.sleep(IDLE_SETTLE_S)
        idle_rss = {
            name: psutil.Process(t.proc.pid).memory_info().rss for name, t in targets.items()
        }
        names = list(TARGETS)
        for level in levels:
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for round_no in range(args.rounds):
                order = names if round_no % 2 == 0 else names[::-1]
                for name in order:
                    result = measure(env, targets[name], level, args)
                    rounds[name].append(result)
                    if name == "observed":
                        served += result["requests"]
                    print(
                        f"streams {level!s:<13} round {round_no + 1}/{args.rounds} {name:<9} "
                        f"{result['rps']:8.0f} rps  p99 {result['p99_ms']:.2f} ms  "
                        f"server {result['server_cpu_us_per_req']:.0f} us/req  "
                        f"failed {result['failed']}",
                        flush=True,
                    )
            table[str(level)] = {name: summarize(rows) for name, rows in rounds.items()}
    finally:
        for target in targets.values():
            stop(target)
        spans = _stop_receiver(receiver_proc)
    ratios = {
        level: {
            "throughput": rows["observed"]["rps"] / rows["plain"]["rps"],
            "p99": rows["observed"]["p99_ms"] / rows["plain"]["p99_ms"],
        }
        for level, rows in table.items()
    }
    print()
    print(f"{'streams':<13} {'plain rps':>10} {'observed rps':>13} {'ratio':>7} {'p99 ratio':>9}")
    for level, rows in table.items():
        print(
            f"{level:<13} {rows['plain']['rps']:>10.0f} {rows['observed']['rps']:>13.0f} "
            f"{ratios[level]['throughput']:>7.3f} {ratios[level]['p99']:>9.2f}"
        )
    met = all(r["throughput"] >= GOAL_THROUGHPUT for r in ratios.values())
    print(
        f"goal: observed >= {GOAL_THROUGHPUT} x plain at every level: {'met' if met else 'NOT met'}"
    )
    mib = {name: rss / 2**20 for name, rss in idle_rss.items()}
    print(f"idle RSS: plain {mib['plain']:.1f} MiB, observed {mib['observed']:.1f} MiB")
    share = spans / served if served else 0.0
    print(
        f"spans exported: {spans} for {served} measured requests ({share:.3f}; warm-ups add some)"
    )
    errors = sum(row["failed"] for rows in table.values() for row in rows.values())
    return {
        "targets": table,
        "ratios": ratios,
        "idle_rss_mib": mib,
        "spans_exported": spans,
        "observed_requests": served,
        "errors": errors,
    }
