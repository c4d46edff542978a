"""Health: one state read by grpc.health.v1 and by HTTP /healthz and /readyz.

Ready means every dependency check passed last time it ran and the service is
not draining. Optional checks (a cache the service can do without) only show in
/readyz's detail: while one fails the status is "degraded", and the service stays
ready. The gRPC health servicer is our own rather than grpc_health's aio
one so that `drain()` also ends open Watch streams: the stock Watch loops
forever and holds `server.stop(grace)` for the whole grace period (see
`grpc_health/v1/_async.py` in grpcio-health-checking).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .errors import ServiceError

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_UNCHECKED = "not checked yet"


class Health(health_pb2_grpc.HealthServicer):
    """Readiness of the service, as a grpc.health.v1 servicer and a JSON report."""

    def __init__(
        self,
        services: Iterable[str],
        checks: dict[str, Check],
        optional: dict[str, Check] | None = None,
    ) -> None:
        # "" is the whole server, as grpc.health.v1 specifies.
        self._services = ("", *services)
        self._checks = checks
        self._failures: dict[str, str] = dict.fromkeys(checks, _UNCHECKED)
        self._optional = optional or {}
        self._degraded: dict[str, str] = dict.fromkeys(self._optional, _UNCHECKED)
        self._draining = False
        self._version = 0
        self._changed = asyncio.Condition()

    @property
    def ready(self) -> bool:
        """True when every check passes and the service is not draining."""
        return not self._draining and not self._failures

    @property
    def draining(self) -> bool:
        """True once shutdown began."""
        return self._draining

    def report(self) -> dict[str, Any]:
        """The /readyz body: overall status and each check's result."""
        checks = {name: self._failures.get(name, "ok") for name in self._checks}
        checks |= {name: self._degraded.get(name, "ok") for name in self._optional}
        if self._draining:
            status = "draining"
        elif not self.ready:
            status = "unavailable"
        else:
            status = "degraded" if self._degraded else "ok"
        return {"status": status, "checks": checks}

    def _status(self, service: str) -> int:
        if service not in self._services:
            return SERVICE_UNKNOWN
        return SERVING if self.ready else NOT_SERVING

    async def _notify(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def probe(self, *, timeout: float) -> None:
        """Run every check once (concurrently, each bounded by `timeout`)."""
        checks = self._checks | self._optional
        names = list(checks)
        results = await asyncio.gather(
            *(asyncio.wait_for(checks[n](), timeout) for n in names),
            return_exceptions=True,
        )
        was_ready = self.ready
        for name, result in zip(names, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            failures = self._failures if name in self._checks else self._degraded
            if isinstance(result, BaseException):
                message = result.message if isinstance(result, ServiceError) else repr(result)
                optional = failures is self._degraded
                before = failures.get(name)
                # An optional check logs once per transition: its errors vary in wording.
                if before != message and not (optional and before not in {None, _UNCHECKED}):
                    log.warning(
                        "dependency check failed",
                        extra={"check": name, "error": message, "optional": optional},
                    )
                failures[name] = message or type(result).__name__
            elif failures.pop(name, None) is not None:
                log.info("dependency check passed", extra={"check": name})
        if self.ready != was_ready:
            await self._notify()

    async def run_probes(self, *, interval: float, timeout: float) -> None:
        """Probe forever every `interval` seconds (run it as a task; cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            await self.probe(timeout=timeout)

    async def drain(self) -> None:
        """Report NOT_SERVING for good and end every Watch stream after telling it so."""
        if not self._draining:
            self._draining = True
            await self._notify()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        """Current status of one service (NOT_FOUND for unknown services)."""
        status = self._status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Stream status changes; ends (OK) after NOT_SERVING once draining."""
        last: int | None = None
        seen = -1
        while True:
            async with self._changed:
                while self._version == seen:
                    await self._changed.wait()
                seen = self._version
            # Read both together: drain() may run while this generator is suspended
            # at the yield, and the stream must still send NOT_SERVING before it ends.
            status, draining = self._status(request.service), self._draining
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if draining:
                return
