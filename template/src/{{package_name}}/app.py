"""Composition root: builds every resource, serves, and tears down in reverse.

The only module that knows all the others. Resources enter one AsyncExitStack
in dependency order, so teardown runs in reverse by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

from . import about, logs, migrate, services, telemetry
from .admin import admin_app
from .alarms import Alarms
from .chain import Admission, Chain, LogSampling, TaskTracker
from .db import Database
from .health import Health
from .httpserver import HttpServer
from .looplag import LoopLag
from .metrics import Metrics, build_labels
from .ratelimit import Rate, RateLimiter
from .server import Served, build
from .settings import Settings, redact
from .shedding import GradientLimit, Shedder
from .shutdown import Signals, graceful
from .tracing import Tracing

log = logging.getLogger(__name__)


def command_name() -> str:
    """How this program was started, for messages: its console script or `python -m`."""
    name = Path(sys.argv[0]).name
    return f"python -m {__package__}" if name in {"", "-c", "-m", "__main__.py"} else name


EXIT_OK = 0
EXIT_FORCED = 1


class NotMigratedError(Exception):
    """The database schema is behind this build."""


async def run_migrations(settings: Settings) -> list[str]:
    """Apply pending migrations; returns the labels applied."""
    async with Database.connect(
        str(settings.database_url), settings.db, application_name=f"{settings.service_name}-migrate"
    ) as db:
        return [m.label for m in await migrate.apply(db)]


def admission(settings: Settings, lag: LoopLag | None) -> Admission | None:
    """Rate limits and load shedding as configured (None when both are off)."""
    limits = settings.rate_limit
    methods = {
        name: None if rate is None else Rate(rate.per_second, rate.burst)
        for name, rate in limits.methods.items()
    }
    limiter = None
    if limits.per_second or methods or limits.caller_per_second:
        limiter = RateLimiter(
            default=Rate(limits.per_second, limits.burst) if limits.per_second else None,
            methods=methods,
            per_caller=(
                Rate(limits.caller_per_second, limits.caller_burst)
                if limits.caller_per_second and limits.caller_header
                else None
            ),
            max_callers=limits.max_callers,
        )
    shed = settings.shedding
    shedder = None
    if shed.enabled:
        reading = None if lag is None or not shed.lag_threshold else lag.lag
        gradient = None
        if shed.adaptive:
            gradient = GradientLimit(
                initial=shed.initial_limit,
                minimum=shed.min_limit,
                maximum=shed.max_in_flight,
                tolerance=shed.tolerance,
                backoff=shed.backoff,
                probe_interval=shed.probe_interval,
                lag=reading,
                lag_threshold=shed.lag_threshold,
            )
        shedder = Shedder(
            max_in_flight=shed.max_in_flight,
            adaptive=gradient,
            deadline_fraction=shed.deadline_fraction,
            lag=reading,
        )
    if limiter is None and shedder is None:
        return None
    return Admission(
        limiter=limiter,
        shedder=shedder,
        retry_after=shed.retry_after,
        caller_header=limits.caller_header,
    )


def build_metrics(settings: Settings) -> Metrics | None:
    """The process's metrics (None when METRICS__ENABLED=false)."""
    if not settings.metrics.enabled:
        return None
    return Metrics(
        build=build_labels(settings.service_name, about.version(), about.TEMPLATE_VERSION)
    )


def build_chain(  # noqa: PLR0913 - the chain's parts, each its own keyword
    settings: Settings,
    tracker: TaskTracker,
    *,
    alarms: Alarms | None = None,
    lag: LoopLag | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> Chain:
    """The request chain every transport serves through, as configured."""
    admitted = admission(settings, lag)
    if admitted is not None and metrics is not None:
        telemetry.admission(metrics, admitted)
    return Chain(
        settings.deadline,
        tracker,
        alarms or Alarms(),
        admitted,
        metrics=metrics,
        spans=None if tracing is None else tracing.requests,
        sampling=LogSampling(ok_ratio=settings.log.sample_ok, slow=settings.log.slow),
    )


async def build_grpc(  # noqa: PLR0913 - the composition's parts, each its own keyword
    settings: Settings,
    db: Database,
    tracker: TaskTracker,
    *,
    port: int,
    alarms: Alarms | None = None,
    lag: LoopLag | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> tuple[Served, Health]:
    """The gRPC server with every service, the chain and health, bound but not started.

    Health has been probed once, so it reports the real state from the first call.
    """
    served = services.build(db)
    health = Health(
        [s.name for s in served],
        {"postgres": partial(db.ping, timeout=settings.admin.probe_timeout)},
    )
    await health.probe(timeout=settings.admin.probe_timeout)
    if metrics is not None:
        telemetry.pool(metrics, db)
    chain = build_chain(settings, tracker, alarms=alarms, lag=lag, metrics=metrics, tracing=tracing)
    grpc_server = build(settings.grpc, port=port, services=served, health=health, chain=chain)
    return grpc_server, health


async def serve(settings: Settings) -> int:
    """Serve until a signal; returns the process exit code."""
    signals = Signals()
    signals.install()
    tracker = TaskTracker()
    # One alarm clock for every deadline the process enforces (alarms.py).
    alarms = Alarms()
    metrics = build_metrics(settings)
    if metrics is not None:
        sink = logs.sink()
        if sink is not None:
            telemetry.log_output(metrics, sink)
    tracing = Tracing.configured(
        service=settings.service_name,
        version=about.version(),
        sample_ratio=settings.tracing.sample_ratio,
    )
    async with AsyncExitStack() as stack:
        if tracing is not None:
            # Registered first, so it runs last: after the servers stopped and the
            # pools closed, every span has ended.
            stack.push_async_callback(tracing.close, settings.tracing.shutdown_timeout)
        flusher = asyncio.create_task(logs.flush_periodically(), name="log-flush")
        stack.push_async_callback(_stop, flusher)
        if settings.log.format == "json":
            # grpc core writes plain-text lines to stderr: keep the stream JSON.
            stack.enter_context(logs.capture_stderr(asyncio.get_running_loop()))
        # --- startup, in dependency order -------------------------------------
        db = await stack.enter_async_context(
            Database.connect(
                str(settings.database_url),
                settings.db,
                application_name=settings.service_name,
                alarms=alarms,
            )
        )
        pending = await migrate.pending(db)
        if pending:
            labels = ", ".join(m.label for m in pending)
            raise NotMigratedError(
                f"database {redact(settings.database_url)} is missing migration(s) {labels}; "
                f"run `{command_name()} migrate` first"
            )
        # The event loop's lag, for load shedding: one sampling task for the process.
        lag = await stack.enter_async_context(
            LoopLag.monitor(
                interval=settings.shedding.lag_interval,
                record=None if metrics is None else telemetry.loop_lag(metrics),
            )
        )
        grpc_server, health = await build_grpc(
            settings,
            db,
            tracker,
            port=settings.grpc_port,
            alarms=alarms,
            lag=lag,
            metrics=metrics,
            tracing=tracing,
        )
        server = grpc_server.server
        await server.start()
        # On error paths only: a graceful run has stopped the server already.
        stack.push_async_callback(server.stop, 0)

        admin = HttpServer(
            admin_app(health, metrics),
            host=settings.admin.host,
            port=settings.admin_port,
            name="admin",
            shutdown_timeout=1.0,
        )
        await admin.start()
        stack.push_async_callback(admin.stop)

        probes = asyncio.create_task(
            health.run_probes(
                interval=settings.admin.probe_interval, timeout=settings.admin.probe_timeout
            ),
            name="health-probes",
        )
        stack.push_async_callback(_stop, probes)
        # Everything built so far lives as long as the process. Frozen, the cyclic
        # GC stops walking it again in every full collection: about 2% of the CPU
        # of a request (`nox -s bench -- --callgrind` in the template). Objects
        # freed by reference counting are still freed.
        gc.collect()
        gc.freeze()
        log.info(
            "serving",
            extra={
                "grpc_port": settings.grpc_port,
                "admin_port": settings.admin_port,
                "database": redact(settings.database_url),
                "metrics": metrics is not None,
                "tracing": tracing is not None,
            },
        )

        # --- run until a signal -----------------------------------------------
        await signals.stop.wait()
        stopping = asyncio.create_task(
            graceful(
                settings.shutdown,
                health=health,
                server=server,
                tracker=tracker,
                http_servers=(),
            )
        )
        forced = asyncio.create_task(signals.force.wait())
        await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not stopping.done():
            stopping.cancel()
            await server.stop(0)
            db.terminate()
            log.warning("forced shutdown")
            return EXIT_FORCED
        stopping.result()
        # --- teardown (the exit stack): admin, then the pool ------------------
    signals.uninstall(ignore=True)
    log.info("shutdown complete")
    return EXIT_OK


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait until it has finished."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
