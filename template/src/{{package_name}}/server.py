"""The gRPC server: options, the chain around every method, health, reflection, services."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from .chain import Chain
from .handlers import Registrar
from .health import Health
from .settings import GrpcSettings

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

# Reflection v1 has the same messages as v1alpha under another package name, so
# v1alpha's servicer and message classes serve it too; grpcio-reflection ships
# only v1alpha, and current clients (grpcurl) ask for v1 first.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass(frozen=True)
class Service:
    """A servicer to serve: its full proto name and how to add it to a server.

    `register` receives a `handlers.Registrar`, which generated
    `add_XServicer_to_server` functions accept in place of the server.
    """

    name: str
    register: Callable[[Any], None]


@dataclass(frozen=True)
class Served:
    """A built, bound, not yet started server, its port and its methods' own handlers.

    `handlers` are unwrapped, by full method name, with the `chain` the server runs
    them through: the HTTP gateway runs them through the same one.
    """

    server: grpc.aio.Server
    port: int
    handlers: dict[str, Handler]
    chain: Chain


def server_options(settings: GrpcSettings) -> list[tuple[str, int]]:
    """Channel arguments of the server, all explicit."""
    ms = 1000
    min_ping_ms = int(settings.min_client_ping_interval * ms)
    return [
        # gRPC sets SO_REUSEPORT by default, so a second, stale instance would bind the
        # same port without an error and silently take part of the traffic.
        ("grpc.so_reuseport", int(settings.reuse_port)),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Keepalive: ping idle clients, and tolerate clients that ping us as often as
        # min_client_ping_interval, even without calls, without a GOAWAY too_many_pings
        # (https://github.com/grpc/grpc/blob/master/doc/keepalive.md).
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * ms)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * ms)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Transport limits. A connection may not open more streams than this at once
        # (clients queue the rest). Calls accepted by grpc core but not yet taken up by
        # the event loop wait in core's backlog: past the soft limit core refuses new
        # ones with a probability that grows to 1 at twice the limit, in C, which is
        # the cheapest refusal the process has (load shedding in Python refuses what
        # gets through, with a retry delay).
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
        # Recycle connections so load rebalances after scale-out.
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * ms)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * ms)),
    ]


def build(
    settings: GrpcSettings,
    *,
    port: int,
    services: Sequence[Service],
    health: Health,
    chain: Chain,
) -> Served:
    """A bound, not yet started server (port 0 picks a free one).

    Raises OSError when the port is taken.
    """
    server = grpc.aio.server(options=server_options(settings))
    registrar = Registrar(server, chain)
    for service in services:
        service.register(registrar)
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    if settings.reflection:
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        names = [s.name for s in services]
        names += [health_name, reflection.SERVICE_NAME, REFLECTION_V1]
        servicer = reflection.aio.ReflectionServicer(names)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            servicer, registrar
        )
        registrar.add_registered_method_handlers(
            REFLECTION_V1,
            {
                "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                    servicer.ServerReflectionInfo,
                    reflection_pb2.ServerReflectionRequest.FromString,
                    reflection_pb2.ServerReflectionResponse.SerializeToString,
                )
            },
        )
    address = f"{settings.host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return Served(server, bound, registrar.handlers, chain)
