"""`healthcheck`: ask the running server for its grpc.health.v1 status, for container checks.

A container HEALTHCHECK needs a command inside the image; this one reuses the
service's own gRPC stack, so the image carries no extra probe binary. It reads the
port and listen address from the same settings `serve` reads.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2

from .settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
_CHECK = "/grpc.health.v1.Health/Check"
# Listen addresses that mean "every interface": the check dials the loopback instead.
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 - compared, not bound


def target(settings: Settings) -> str:
    """The address of the local gRPC server: `localhost` when it listens on every interface."""
    host = settings.grpc.host
    if host in _ANY_ADDRESS:
        host = "localhost"
    return f"{host}:{settings.grpc_port}"


def check(address: str, *, service: str = "", timeout: float) -> str | None:
    """None when `service` ("" is the whole server) is SERVING, else what is wrong.

    Never waits longer than `timeout` seconds: the deadline covers connecting too.
    """
    with grpc.insecure_channel(address) as channel:
        # The multicallable rather than HealthStub: the stub's type stubs lack its methods.
        call: grpc.UnaryUnaryMultiCallable[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ] = channel.unary_unary(
            _CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = call(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            # Errors raised by a call are also its grpc.Call, with a code and details.
            code, details = exc.code(), exc.details()
            return f"health check of {address} failed: {code.name}: {details}"
    if response.status != SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return f"{address} reports {status}"
    return None


def run(settings: Settings, *, service: str, timeout: float) -> int:
    """The `healthcheck` command: exit code 0 when SERVING, else 1 with one line on stderr."""
    problem = check(target(settings), service=service, timeout=timeout)
    if problem is None:
        return 0
    print(problem, file=sys.stderr)  # noqa: T201 - the command's one line of output
    return 1
