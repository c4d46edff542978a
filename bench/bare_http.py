"""The HTTP baseline of the benchmark: GetItem as a bare uvicorn + asyncpg endpoint.

Runs with the generated project's Python. `GET /v1/items/<id>` runs the service's
query with the same asyncpg pool (size, no session reset) and answers the same JSON
(orjson), through
uvicorn with httptools, and nothing else: no routing table, no deadlines, no
logging. Prints `READY <port>` on stdout once it serves; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import uvicorn

QUERY = "SELECT id, name, description, create_time, update_time, version FROM items WHERE id = $1"
PREFIX = "/v1/items/"
_JSON = [(b"content-type", b"application/json")]

Message = MutableMapping[str, Any]


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _app(pool: asyncpg.Pool) -> Callable[..., Awaitable[None]]:
    async def app(
        scope: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        del receive
        path: str = scope["path"]
        status, body = 404, b'{"code":5,"message":"not found"}'
        if path.startswith(PREFIX):
            try:
                item_id = uuid.UUID(path.removeprefix(PREFIX))
            except ValueError:
                status, body = 400, b'{"code":3,"message":"id must be a UUID"}'
            else:
                row = await pool.fetchrow(QUERY, item_id)
                if row is not None:
                    status = 200
                    body = orjson.dumps(
                        {
                            "id": str(row["id"]),
                            "name": row["name"],
                            "description": row["description"],
                            "etag": f'W/"{row["version"]}"',
                            "createTime": _time(row["create_time"]),
                            "updateTime": _time(row["update_time"]),
                        }
                    )
        headers = [*_JSON, (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def serve(args: argparse.Namespace) -> None:
    """Serve until a signal."""

    async def keep_session(connection: object) -> None:
        del connection

    # No session reset on release, as the service's pool (DB__RESET_SESSION): the
    # same work in PostgreSQL per request on both sides.
    async with asyncpg.create_pool(
        args.dsn,
        min_size=args.min_size,
        max_size=args.max_size,
        server_settings={"application_name": "bench-bare-http"},
        reset=keep_session,
    ) as pool:
        config = uvicorn.Config(
            _app(pool),
            host="127.0.0.1",
            port=args.port,
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
        )
        # uvicorn's own signal handling stops it on SIGTERM.
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, not an event
            await asyncio.sleep(0.01)
        print(f"READY {args.port}", flush=True)
        await task


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--min-size", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=10)
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
