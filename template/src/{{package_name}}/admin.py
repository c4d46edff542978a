"""Admin HTTP endpoints: /healthz (liveness) and /readyz (readiness).

/healthz answers 200 while the event loop runs; a wedged process stops
answering and gets restarted. /readyz answers 200 only when dependencies are
reachable and the service is not draining, else 503 with the failing checks.
"""

from __future__ import annotations

import json
from typing import Any

from .health import Health
from .httpserver import ASGIApp, Receive, Scope, Send


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"cache-control", b"no-store"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def admin_app(health: Health) -> ASGIApp:
    """The ASGI app of the admin port."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path not in {"/healthz", "/readyz"}:
            await _reply(send, 404, {"status": "not found", "path": path})
        elif method not in {"GET", "HEAD"}:
            await _reply(send, 405, {"status": "method not allowed"})
        elif path == "/healthz":
            await _reply(send, 200, {"status": "ok"})
        else:
            await _reply(send, 200 if health.ready else 503, health.report())

    return app
