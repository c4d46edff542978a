"""Admin HTTP endpoints: /healthz (liveness), /readyz (readiness), /metrics.

/healthz answers 200 while the event loop runs; a wedged process stops
answering and gets restarted. /readyz answers 200 only when dependencies are
reachable and the service is not draining, else 503 with the failing checks.
/metrics is the Prometheus text format (absent when METRICS__ENABLED=false).
"""

from __future__ import annotations

import json
from typing import Any

from .health import Health
from .httpserver import ASGIApp, Receive, Scope, Send
from .metrics import CONTENT_TYPE, Metrics


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


def admin_app(health: Health, metrics: Metrics | None = None) -> ASGIApp:
    """The ASGI app of the admin port."""
    paths = {"/healthz", "/readyz"} | ({"/metrics"} if metrics is not None else set())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path not in paths:
            await _reply(send, 404, {"status": "not found", "path": path})
        elif method not in {"GET", "HEAD"}:
            await _reply(send, 405, {"status": "method not allowed"})
        elif path == "/healthz":
            await _reply(send, 200, {"status": "ok"})
        elif path == "/readyz":
            await _reply(send, 200 if health.ready else 503, health.report())
        elif metrics is not None:
            await _send(send, 200, CONTENT_TYPE.encode(), metrics.exposition())

    return app
