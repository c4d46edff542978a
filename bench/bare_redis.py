"""The baseline of the cache benchmark: GetItem on a bare grpc.aio server, from Redis.

Runs with the generated project's Python (its stubs, redis-py and orjson). Reads the
very entry the generated service caches for the item (`<prefix>:c<schema>:items:<id>`,
`rank|payload`), decodes it as the service does and answers the Item: one Redis GET
per call on a pooled redis.asyncio client, and nothing else (no interceptors,
deadlines, logging, breaker or metrics).
Prints `READY <port>` on stdout once it serves; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import grpc
import orjson
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

if TYPE_CHECKING:
    from types import ModuleType


class _GetItemRequest(Protocol):
    id: str


def _timestamp(value: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(value))
    return stamp


def _servicer(
    stubs: ModuleType, grpc_stubs: ModuleType, client: aioredis.Redis, prefix: str
) -> object:
    """The generated servicer base (other methods answer UNIMPLEMENTED) with GetItem."""

    async def get_item(request: _GetItemRequest, context: grpc.aio.ServicerContext) -> object:
        raw = await client.get(f"{prefix}:{request.id}")
        if raw is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "item not cached")
        rank, _, payload = raw.partition(b"|")
        name, description, created, updated = orjson.loads(payload)
        return stubs.Item(
            id=request.id,
            name=name,
            description=description,
            create_time=_timestamp(created),
            update_time=_timestamp(updated),
            etag=f'W/"{int(rank)}"',
        )

    servicer = grpc_stubs.ItemServiceServicer()
    servicer.GetItem = get_item
    return servicer


async def serve(args: argparse.Namespace) -> None:
    """Serve until a signal."""
    stubs = importlib.import_module(f"{args.package}.v1.items_pb2")
    grpc_stubs = importlib.import_module(f"{args.package}.v1.items_pb2_grpc")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = aioredis.BlockingConnectionPool.from_url(args.redis, max_connections=args.max_size)
    client = aioredis.Redis(connection_pool=pool)
    try:
        server = grpc.aio.server()
        grpc_stubs.add_ItemServiceServicer_to_server(
            _servicer(stubs, grpc_stubs, client, args.prefix), server
        )
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
        await server.start()
        print(f"READY {port}", flush=True)
        await stop.wait()
        await server.stop(1)
    finally:
        await client.aclose()
        await pool.aclose()


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", required=True, help="import package of the project")
    parser.add_argument("--redis", required=True, help="Redis URL")
    parser.add_argument("--prefix", required=True, help="key prefix up to the item id")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-size", type=int, default=20)
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
