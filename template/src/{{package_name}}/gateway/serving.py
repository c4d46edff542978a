"""The gateway as the app serves it: routes of every registered service, on HTTP_PORT."""

from __future__ import annotations

import logging
from importlib import metadata

from google.protobuf import descriptor_pool

from ..connections import ConnectionLimits
from ..httpserver import HttpServer, Timeouts
from ..server import Served
from ..settings import Settings
from . import comments, openapi, reference
from .asgi import Gateway, Limits
from .routes import RouteError, Router

__all__ = ["RouteError", "app", "http_server", "routes_of"]

log = logging.getLogger(__name__)


def routes_of(served: Served) -> Router:
    """Routes from the `google.api.http` annotations of every service `served` registered.

    Raises RouteError naming every annotation that cannot be served.
    """
    pool = descriptor_pool.Default()
    services = []
    for name in sorted({method.split("/")[1] for method in served.handlers}):
        try:
            services.append(pool.FindServiceByName(name))
        except KeyError:
            continue  # served without descriptors of its own (reflection v1): no annotations
    router = Router.build(services)
    if router.unrouted:
        log.info(
            "methods not exposed over HTTP: request streams need gRPC",
            extra={"methods": list(router.unrouted)},
        )
    return router


def app(settings: Settings, served: Served) -> Gateway:
    """The gateway's ASGI app over `served`'s methods and chain."""
    router = routes_of(served)
    gateway = settings.gateway
    builtins = {}
    if gateway.openapi:
        package = __package__.rpartition(".")[0]
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "0.0.0"
        document = openapi.document(
            router.routes,
            title=settings.service_name,
            version=version,
            descriptions=comments.load(package),
        )
        builtins = reference.builtins(document, page=gateway.docs)
    limits = Limits(
        max_body_bytes=gateway.max_body_bytes or settings.grpc.max_message_bytes,
        metadata_headers=frozenset(gateway.metadata_headers),
    )
    return Gateway(router, served.handlers, served.chain, limits=limits, builtins=builtins)


def http_server(settings: Settings, served: Served, *, port: int | None = None) -> HttpServer:
    """The gateway's HTTP server on HTTP_PORT (or `port`), not yet started.

    Raises RouteError when the annotations cannot be served.
    """
    gateway = settings.gateway
    return HttpServer(
        app(settings, served),
        host=gateway.host,
        port=settings.http_port if port is None else port,
        name="gateway",
        timeouts=Timeouts(
            keep_alive=gateway.keep_alive_timeout,
            head=gateway.header_timeout,
            shutdown=settings.shutdown.grace,
        ),
        limits=ConnectionLimits(
            max_connections=gateway.max_connections,
            max_header_bytes=gateway.max_header_bytes,
        ),
    )
