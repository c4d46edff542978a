"""`/openapi.json` and a browsable API reference at `/docs`, from packaged files only.

The page is Swagger UI, from the swagger-ui-bundle-v2 package (its static
files, pinned with the package): nothing is loaded from a CDN, and the page's
Content-Security-Policy lets it load and call nothing but this server.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from swagger_ui_bundle import swagger_ui_path

from ..httpserver import Send

DOCUMENT = "/openapi.json"
PAGE = "/docs"

# Swagger UI sets inline styles; scripts and requests stay on this origin.
_POLICY = (
    b"default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    b"frame-ancestors 'none'"
)
_INDEX = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>%(title)s</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""
# validatorUrl null: Swagger UI would otherwise send the document to an online validator.
_INIT = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
};
"""
_STATIC = {
    "swagger-ui.css": b"text/css; charset=utf-8",
    "swagger-ui-bundle.js": b"text/javascript; charset=utf-8",
    "favicon-32x32.png": b"image/png",
}

Builtin = Callable[[str, Send], Awaitable[None]]


def builtins(document: dict[str, Any], *, page: bool) -> dict[str, Builtin]:
    """The gateway's own GET paths: the document, and the page and its files if `page`."""
    paths: dict[str, Builtin] = {DOCUMENT: _fixed(orjson.dumps(document), b"application/json")}
    if page:
        title = str(document.get("info", {}).get("title", "API")).encode()
        index = _INDEX % {b"title": _escape(title)}
        paths[PAGE] = _fixed(index, b"text/html; charset=utf-8")
        paths[f"{PAGE}/init.js"] = _fixed(_INIT, b"text/javascript; charset=utf-8")
        for name, media in _STATIC.items():
            paths[f"{PAGE}/{name}"] = _packaged(Path(str(swagger_ui_path)) / name, media)
    return paths


def _escape(text: bytes) -> bytes:
    return text.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;")


def _fixed(body: bytes, media: bytes) -> Builtin:
    async def serve(method: str, send: Send) -> None:
        await _send(send, method, body, media)

    return serve


def _packaged(path: Path, media: bytes) -> Builtin:
    # Read on first use and kept: the page is rarely opened, its script is 1.5 MB.
    load = functools.cache(path.read_bytes)

    async def serve(method: str, send: Send) -> None:
        await _send(send, method, load(), media, cache=b"public, max-age=86400")

    return serve


async def _send(
    send: Send, method: str, body: bytes, media: bytes, *, cache: bytes = b"no-cache"
) -> None:
    headers = [
        (b"content-type", media),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", cache),
        (b"content-security-policy", _POLICY),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
