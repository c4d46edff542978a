"""Closed-loop load generator of the benchmark: GetItem at a fixed concurrency.

Runs with the generated project's Python (it imports the project's stubs once, to
name the method and to encode the request). The hot loop sends pre-encoded request
bytes and takes the response bytes as they are, so the client costs as little CPU
as possible and exactly the same for every target.

Protocol on stdout, one line each: `START` when the measured window opens, `END`
when it closes (the caller samples server CPU at both), then `RESULT <json>`.
Every request that fails counts as an error; the process exits 1 if there was any.

With `--requests N` the window is a count instead of a time: after the warm-up the
load stops, `START` is printed and the client waits for a line on stdin before it
sends exactly N requests; `END` follows when all have completed. The server is idle
at both marks, which is what an instruction count (callgrind) needs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import grpc

# Separate TCP connections per channel: without this, channels to the same target
# with the same arguments share one subchannel (and one connection).
_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Window:
    """The measured window and what completed in it."""

    start: float = float("inf")
    end: float = float("inf")
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_sample: str = ""
    stop: bool = False
    # Requests still to send, in count mode (None: until `stop`).
    budget: int | None = None


async def _worker(
    call: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, deadline_s: float, window: Window
) -> None:
    clock = time.perf_counter
    latencies = window.latencies
    while not window.stop:
        if window.budget is not None:
            if window.budget <= 0:
                return
            window.budget -= 1
        sent = clock()
        try:
            await call(payload, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            window.errors += 1
            if not window.error_sample:
                window.error_sample = f"{exc.code().name}: {exc.details()}"
            continue
        done = clock()
        if window.start <= done <= window.end:
            latencies.append(done - sent)


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, round(q * (len(ordered) - 1)))
    return ordered[index]


async def _check(
    channel: grpc.aio.Channel, method: str, payload: bytes, item_type: type, item_id: str
) -> None:
    """One call before the load: the target answers, with the requested item."""
    call = channel.unary_unary(method)
    raw = await call(payload, timeout=10, wait_for_ready=True)
    item = item_type.FromString(raw)
    if item.id != item_id:
        raise RuntimeError(f"target answered item {item.id!r}, expected {item_id!r}")


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Generate the load and return the measurements."""
    stubs = importlib.import_module(f"{args.package}.v1.items_pb2")
    service = stubs.DESCRIPTOR.services_by_name["ItemService"].full_name
    method = f"/{service}/GetItem"
    payload = stubs.GetItemRequest(id=args.item_id).SerializeToString()
    channels = [
        grpc.aio.insecure_channel(args.target, options=_CHANNEL_OPTIONS)
        for _ in range(args.channels)
    ]
    window = Window()
    try:
        for channel in channels:
            await _check(channel, method, payload, stubs.Item, args.item_id)
        calls = [channel.unary_unary(method) for channel in channels]

        def start_workers() -> list[asyncio.Task[None]]:
            return [
                asyncio.create_task(_worker(calls[i % len(calls)], payload, args.timeout, window))
                for i in range(args.concurrency)
            ]

        async def finish(workers: list[asyncio.Task[None]]) -> None:
            # In-flight calls finish on their own (cancelling them leaks in grpc.aio, C17).
            await asyncio.wait_for(asyncio.gather(*workers), timeout=args.timeout + 5)

        workers = start_workers()
        await asyncio.sleep(args.warmup)
        if args.requests is not None:
            window.stop = True
            await finish(workers)
            window.stop, window.budget = False, args.requests
            print("START", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            workers = start_workers()
        cpu_start = time.process_time()
        window.start = time.perf_counter()
        if args.requests is None:
            print("START", flush=True)
            await asyncio.sleep(args.seconds)
            window.stop = True
        else:
            await finish(workers)
        window.end = time.perf_counter()
        cpu = time.process_time() - cpu_start
        print("END", flush=True)
        await finish(workers)
    finally:
        for channel in channels:
            await channel.close()
    ordered = sorted(window.latencies)
    elapsed = window.end - window.start
    ms = 1000.0
    return {
        "requests": len(ordered),
        "elapsed_s": elapsed,
        "rps": len(ordered) / elapsed,
        "errors": window.errors,
        "error_sample": window.error_sample,
        "client_cpu_s": cpu,
        "latency_ms": {
            "mean": statistics.fmean(ordered) * ms if ordered else float("nan"),
            "p50": _quantile(ordered, 0.50) * ms,
            "p90": _quantile(ordered, 0.90) * ms,
            "p99": _quantile(ordered, 0.99) * ms,
            "max": ordered[-1] * ms if ordered else float("nan"),
        },
    }


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", required=True, help="import package of the project")
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--item-id", required=True)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each call")
    parser.add_argument(
        "--requests", type=int, help="measure exactly this many requests instead of --seconds"
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print("RESULT " + json.dumps(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
