"""The HTTP baselines of the benchmark: GetItem as a bare uvicorn + asyncpg endpoint.

Runs with the generated project's Python. `GET /v1/items/<id>` runs the service's
query with the same asyncpg pool (size, no session reset) and answers the same JSON
(orjson), through uvicorn with httptools, and nothing else: no routing table, no
deadlines, no logging.

`--required-work` adds, inline and with the service's own pieces, the work the
gateway's issue requires of every request whatever the design: the id checked
as the domain checks it, the row made a domain Item and then the protobuf message
(`to_proto`), that message in the proto3 JSON mapping (the gateway's Encoder), a
request id (the caller's `x-request-id`, else a new one, echoed), a deadline
enforced by an alarm, the request scope set for the handler, and the request's
JSON log line at INFO (queued and written in batches, as the service does). No
routing, chain, metrics, admission, breakers or retries: the least a gateway that
meets the issue could cost, and so a ceiling for its ratio to the bare endpoint.

Prints `READY <port>` on stdout once it serves; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import importlib
import logging
import random
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Any

import asyncpg
import orjson
import uvicorn

QUERY = "SELECT id, name, description, create_time, update_time, version FROM items WHERE id = $1"
PREFIX = "/v1/items/"
# A request id the gateway takes from `x-request-id`: 1 to 128 visible ASCII characters.
_SANE_ID = re.compile(rb"[\x21-\x7e]{1,128}")
# The log line's method (the service names the full gRPC method).
METHOD = "/acme.items.v1.ItemService/GetItem"
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


def _required_app(pool: asyncpg.Pool, package: str) -> Callable[..., Awaitable[None]]:
    """`_app` plus the work every gateway request must do (see the module's docstring)."""

    def part(module: str, name: str) -> Any:
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    parse_id = part("domain.items", "_parse_id")
    to_domain = part("repo.items", "_item")
    to_proto = part("api.items", "to_proto")
    encoder = part("gateway.encoder", "Encoder")()
    request_line = part("logs", "request")
    code = part("errors", "Code")
    codes = {200: code.OK, 400: code.INVALID_ARGUMENT, 404: code.NOT_FOUND}
    invalid = part("errors", "InvalidArgument")
    alarms = part("alarms", "Alarms")()
    deadline = part("settings", "DeadlineSettings")().default
    scope: contextvars.ContextVar[str | None] = contextvars.ContextVar("scope", default=None)
    logger = logging.getLogger(f"{package}.chain")
    loop = asyncio.get_running_loop()

    async def app(
        scope_: Message,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        del receive
        started = time.monotonic()
        given = next((v for name, v in scope_["headers"] if name == b"x-request-id"), None)
        if given is not None and _SANE_ID.fullmatch(given):
            request_id = given.decode()
        else:
            request_id = random.getrandbits(64).to_bytes(8).hex()
        alarm = alarms.arm(loop.time() + deadline, asyncio.current_task(loop))
        token = scope.set(request_id)
        path: str = scope_["path"]
        status, body = 404, b'{"code":5,"message":"not found"}'
        if path.startswith(PREFIX):
            try:
                item_id = parse_id(path.removeprefix(PREFIX), "id")
            except invalid:
                status, body = 400, b'{"code":3,"message":"id must be a UUID"}'
            else:
                row = await pool.fetchrow(QUERY, item_id)
                if row is not None:
                    status, body = 200, encoder.json(to_proto(to_domain(row)))
        alarm.disarm()
        scope.reset(token)
        line = (time.monotonic(), started, METHOD, "http", codes[status], request_id, {})
        request_line(logger, line)
        headers = [
            *_JSON,
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def serve(args: argparse.Namespace) -> None:
    """Serve until a signal."""
    flusher = None
    if args.required_work:
        logs = importlib.import_module(f"{args.package}.logs")
        logs.configure(level="INFO", fmt="json")
        flusher = asyncio.create_task(logs.flush_periodically())

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
        app = _required_app(pool, args.package) if args.required_work else _app(pool)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=args.port,
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            # With required work, the service's log handlers stay as they are.
            **({"log_config": None} if args.required_work else {}),
        )
        # uvicorn's own signal handling stops it on SIGTERM.
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, not an event
            await asyncio.sleep(0.01)
        print(f"READY {args.port}", flush=True)
        await task
    if flusher is not None:
        flusher.cancel()


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--min-size", type=int, default=2)
    parser.add_argument("--max-size", type=int, default=10)
    parser.add_argument("--package", default="acme_items", help="the project's package")
    parser.add_argument(
        "--required-work", action="store_true", help="add the work every gateway request must do"
    )
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
