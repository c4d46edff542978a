"""The baseline of the benchmark: GetItem on a bare grpc.aio server.

Runs with the generated project's Python (it imports the project's generated stubs).
Same query, same asyncpg pool size and same Item conversion as the generated
service, and nothing else: no interceptors, no deadlines, no logging, no health.
A stock asyncpg pool, which resets each connection's session with one more query
when it returns; `--no-reset` skips that, as the generated service does by default
(DB__RESET_SESSION), to compare the two on equal terms.
Prints `READY <port>` on stdout once it serves; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
import uuid
from typing import TYPE_CHECKING, Protocol

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

if TYPE_CHECKING:
    from datetime import datetime
    from types import ModuleType

QUERY = "SELECT id, name, description, create_time, update_time, version FROM items WHERE id = $1"


class _GetItemRequest(Protocol):
    id: str


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _servicer(stubs: ModuleType, grpc_stubs: ModuleType, pool: asyncpg.Pool) -> object:
    """Build the generated servicer base (other methods answer UNIMPLEMENTED) with GetItem."""

    async def get_item(request: _GetItemRequest, context: grpc.aio.ServicerContext) -> object:
        try:
            item_id = uuid.UUID(request.id)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id must be a UUID")
        row = await pool.fetchrow(QUERY, item_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "item not found")
        return stubs.Item(
            id=str(row["id"]),
            name=row["name"],
            description=row["description"],
            create_time=_timestamp(row["create_time"]),
            update_time=_timestamp(row["update_time"]),
            etag=f'W/"{row["version"]}"',
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

    async def keep_session(connection: object) -> None:
        del connection

    async with asyncpg.create_pool(
        args.dsn,
        min_size=args.min_size,
        max_size=args.max_size,
        server_settings={"application_name": "bench-bare"},
        **({"reset": keep_session} if args.no_reset else {}),
    ) as pool:
        server = grpc.aio.server()
        grpc_stubs.add_ItemServiceServicer_to_server(_servicer(stubs, grpc_stubs, pool), server)
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
        await server.start()
        print(f"READY {port}", flush=True)
        await stop.wait()
        await server.stop(1)


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--package", required=True, help="import package of the project")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=10)
    parser.add_argument("--no-reset", action="store_true", help="skip the session reset on release")
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
