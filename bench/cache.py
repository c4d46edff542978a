"""Cache benchmark: GetItem on a cache hit and on a miss, against a bare server reading Redis.

One generated service with its Redis cache (REDIS_URL, a key prefix of this run) and
two items in PostgreSQL:

- `hit`: GetItem of the first item, whose entry is in Redis: one Redis GET per call;
- `miss`: GetItem of the second item, whose entry holds a higher version with a
  payload the service cannot read, so that every call misses: a Redis GET, the
  PostgreSQL read, and the compare-and-set fill (which the higher version refuses,
  so the entry stays and the next call misses again) - the whole miss path;
- `bare-redis`: bench/bare_redis.py, a bare grpc.aio server answering GetItem from
  the same Redis entry as `hit` (one GET, the same decoding), nothing else.

All three are driven by h2load in alternating rounds at each concurrency level (order
reversed on odd rounds). Goal: `hit` reaches at least 0.85 of `bare-redis`'s
throughput, and `hit` is faster than `miss`. Keys of the run are removed at the end.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h2load

GOAL_HIT_OVER_BARE = 0.85
NAMES = ("bare-redis", "hit", "miss")


@dataclass
class Helpers:
    """What the scenario needs of bench/run.py (passed in, to avoid an import cycle)."""

    start_service: Callable[..., Any]
    start_process: Callable[..., Any]
    stop: Callable[[Any], None]
    measure: Callable[..., dict[str, Any]]
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]
    project_python: Callable[..., str]
    insert_item: Callable[[str], str]
    encoded_request: Callable[[Any, str], bytes]
    check_call: Callable[[Any, Any, str], None]


# Run with the project's Python: argv = url, key, value (utf-8); or url, pattern to delete.
_SET = (
    "import sys, redis\n"
    "client = redis.Redis.from_url(sys.argv[1])\n"
    "client.set(sys.argv[2], sys.argv[3].encode())\n"
)
_DELETE = (
    "import sys, redis\n"
    "client = redis.Redis.from_url(sys.argv[1])\n"
    "keys = list(client.scan_iter(match=sys.argv[2]))\n"
    "print(client.delete(*keys) if keys else 0)\n"
)
_SCHEMA = "from {package}.cache import SCHEMA_VERSION\nprint(SCHEMA_VERSION)\n"


def run(
    args: Any,
    env: Any,
    helpers: Helpers,
    *,
    package: str,
    levels: list[h2load.Level],
) -> dict[str, Any]:
    """Every level, the three targets alternating; the ratios."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    schema = helpers.project_python(env, _SCHEMA.format(package=package))
    items_prefix = f"{prefix}:c{schema}:items"
    hit_id = env.item_id
    miss_id = helpers.insert_item(env.dsn)
    payloads = {}
    for name, item_id in (("hit", hit_id), ("miss", miss_id), ("bare-redis", hit_id)):
        payloads[name] = env.work / f"getitem-{name}.bin"
        payloads[name].write_bytes(h2load.grpc_frame(helpers.encoded_request(env, item_id)))
    settings = {"REDIS_URL": args.redis, "CACHE__ENABLED": "true", "CACHE__KEY_PREFIX": prefix}
    targets: dict[str, Any] = {}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        service = helpers.start_service(env, "service", level="INFO", settings=settings)
        targets["hit"] = targets["miss"] = service
        helpers.check_call(env, service, hit_id)  # a miss that fills the hit's entry
        # An entry the service cannot read, at a version above the row's: every call
        # misses, reads PostgreSQL, and its fill is refused.
        helpers.project_python(env, _SET, args.redis, f"{items_prefix}:{miss_id}", "999|x")
        helpers.check_call(env, service, miss_id)
        targets["bare-redis"] = helpers.start_process(
            env,
            "bare-redis",
            [
                f"--package={package}",
                f"--redis={args.redis}",
                f"--prefix={items_prefix}",
            ],
        )
        helpers.check_call(env, targets["bare-redis"], hit_id)
        for level in levels:
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in NAMES}
            for round_no in range(args.rounds):
                order = NAMES if round_no % 2 == 0 else NAMES[::-1]
                for name in order:
                    env.payload = payloads[name]
                    result = helpers.measure(env, targets[name], level, args) | {"target": name}
                    rounds[name].append(result)
                    print(
                        f"streams {level!s:<13} round {round_no + 1}/{args.rounds} {name:<10} "
                        f"{result['rps']:8.0f} rps  p50 {result['p50_ms']:.2f} ms  "
                        f"p99 {result['p99_ms']:.2f} ms  "
                        f"server {result['server_cpu_us_per_req']:.0f} us/req  "
                        f"failed {result['failed']}",
                        flush=True,
                    )
            table[str(level)] = {name: helpers.summarize(rows) for name, rows in rounds.items()}
        lookups = _lookups(targets["hit"])
    finally:
        for target in {id(t): t for t in targets.values()}.values():
            helpers.stop(target)
        removed = helpers.project_python(env, _DELETE, args.redis, f"{prefix}:*")
        print(f"removed {removed} key(s) of prefix {prefix}")
    print(f"the service's cache lookups (warm-ups and checks included): {lookups}")
    return _report(table) | {"lookups": lookups}


def _lookups(target: Any) -> dict[str, float]:
    """cache_requests_total of the service by result, from its /metrics."""
    admin = None
    for line in target.log.read_text(errors="replace").splitlines():
        if '"msg":"serving"' in line:
            admin = json.loads(line)["admin_port"]
    if admin is None:
        raise RuntimeError(f"{target.name} logged no admin port")
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("cache_requests_total{"):
            labels, _, value = line.rpartition(" ")
            result = labels.split('result="', 1)[1].split('"', 1)[0]
            found[result] = float(value)
    return found


def _report(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    ratios = {
        level: {
            "hit/bare-redis": rows["hit"]["rps"] / rows["bare-redis"]["rps"],
            "hit/miss": rows["hit"]["rps"] / rows["miss"]["rps"],
        }
        for level, rows in table.items()
    }
    print()
    header = (
        f"{'streams':<13} {'target':<11} {'rps':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'server us/req':>13} {'pg us/req':>9}"
    )
    print(header)
    print("-" * len(header))
    for level, rows in table.items():
        for name in NAMES:
            row = rows[name]
            print(
                f"{level:<13} {name:<11} {row['rps']:>8.0f} {row['p50_ms']:>7.2f} "
                f"{row['p99_ms']:>7.2f} {row['server_cpu_us_per_req']:>13.0f} "
                f"{row['postgres_cpu_us_per_req']:>9.0f}"
            )
        print(
            f"{'':<13} hit/bare-redis {ratios[level]['hit/bare-redis']:.3f}  "
            f"hit/miss {ratios[level]['hit/miss']:.2f}"
        )
    met = all(
        r["hit/bare-redis"] >= GOAL_HIT_OVER_BARE and r["hit/miss"] > 1 for r in ratios.values()
    )
    print(
        f"goal: hit >= {GOAL_HIT_OVER_BARE} x bare-redis and hit faster than miss at every "
        f"level: {'met' if met else 'NOT met'}"
    )
    errors = sum(row["failed"] for rows in table.values() for row in rows.values())
    return {"targets": table, "ratios": ratios, "errors": errors}
