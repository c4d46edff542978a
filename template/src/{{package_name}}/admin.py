"""Admin HTTP endpoints: /healthz, /readyz, /metrics, /debug/pool, /debug/tasks.

/healthz answers 200 while the event loop runs; a wedged process stops
answering and gets restarted. /readyz answers 200 only when dependencies are
reachable and the service is not draining, else 503 with the failing checks.
/metrics is the Prometheus text format (absent when METRICS__ENABLED=false).
/debug/pool is the database pool's state and the connections held too long now;
/debug/tasks every asyncio task with its coroutine and stack (JSON). They show
code locations and request ids: the admin port is for operators and probes only,
never exposed publicly (docs/operations.md).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from .health import Health
from .httpserver import ASGIApp, Receive, Scope, Send
from .metrics import CONTENT_TYPE, Metrics
from .tasks import dump


async def _send(send: Send, status: int, content_type: bytes, payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"cache-control", b"no-store"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    await _send(send, status, b"application/json", json.dumps(body).encode())


def admin_app(
    health: Health,
    metrics: Metrics | None = None,
    *,
    pool: Callable[[], dict[str, Any]] | None = None,
) -> ASGIApp:
    """The ASGI app of the admin port; `pool` gives /debug/pool (`Database.debug`)."""
    answers = _answers(health, metrics, pool)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        answer = answers.get(path)
        if answer is None:
            await _reply(send, 404, {"status": "not found", "path": path})
        elif method not in {"GET", "HEAD"}:
            await _reply(send, 405, {"status": "method not allowed"})
        else:
            await answer(send)

    return app


Answer = Callable[[Send], Awaitable[None]]


def _answers(
    health: Health, metrics: Metrics | None, pool: Callable[[], dict[str, Any]] | None
) -> dict[str, Answer]:
    """What each path answers (paths of parts switched off are absent: 404)."""

    async def healthz(send: Send) -> None:
        await _reply(send, 200, {"status": "ok"})

    async def readyz(send: Send) -> None:
        await _reply(send, 200 if health.ready else 503, health.report())

    async def tasks(send: Send) -> None:
        await _reply(send, 200, {"tasks": dump()})

    answers: dict[str, Answer] = {"/healthz": healthz, "/readyz": readyz, "/debug/tasks": tasks}
    if metrics is not None:
        scrape = metrics.exposition

        async def exposition(send: Send) -> None:
            await _send(send, 200, CONTENT_TYPE.encode(), scrape())

        answers["/metrics"] = exposition
    if pool is not None:
        state = pool

        async def pool_state(send: Send) -> None:
            await _reply(send, 200, state())

        answers["/debug/pool"] = pool_state
    return answers
