"""Prometheus metrics: counted on the request path without locks, read at scrape time.

The request chain counts into plain attributes of one `MethodStats` per method and
transport (a request is one event loop's work: no lock is needed), and a collector
turns them into Prometheus families when `/metrics` is scraped. prometheus_client's
own Counter and Histogram take a lock per update, and a labelled one a dictionary
lookup per call; on every request, that cost more than the counting itself.

Names follow the gRPC ecosystem's (go-grpc-prometheus / grpc-ecosystem):
`grpc_server_started_total`, `grpc_server_handled_total`,
`grpc_server_handling_seconds`, labelled `grpc_service`, `grpc_method`, `grpc_type`,
plus `transport` (grpc or http: gateway calls are counted under the gRPC method they
run). Other parts of the service register their own families with `Metrics.register`
(a callable yielding families), so what is switched off is absent, not zero.
"""

from __future__ import annotations

import asyncio
import bisect
import sys
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .errors import Code

# Bucket bounds of request latencies, in seconds: from a cache hit (1 ms) to the longest
# deadline (DEADLINE__MAXIMUM, 30 s by default), denser where GetItem-like calls fall.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Bucket bounds of the deadline left when a request arrives, in seconds.
DEADLINE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds of the event loop's lag, in seconds.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_CODES = tuple(Code)
_KINDS = frozenset({"unary", "client_stream", "server_stream", "bidi_stream"})
REASONS = ("rate_limit", "shed")
_LABELS = ["grpc_service", "grpc_method", "grpc_type"]

Families = Callable[[], Iterable[Metric]]


class Histogram:
    """Counts per bucket (the last one is +Inf), their sum and count; no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative buckets as prometheus_client wants them (`le`, count)."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


def method_labels(full_method: str, kind: str) -> list[str]:
    """grpc_service, grpc_method and grpc_type of `/pkg.Service/Method`."""
    if kind not in _KINDS:
        raise ValueError(f"grpc_type must be one of {sorted(_KINDS)}, not {kind!r}")
    service, _, method = full_method.strip("/").partition("/")
    return [service, method, kind]


class CallStats:
    """Calls of one method: started, finished by code, latency. No lock.

    Counted by one event loop (the only one that runs requests), so `+=` on plain
    attributes is enough.
    """

    __slots__ = ("handled", "labels", "latency", "started")

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.started = 0
        # Finished calls by status code (indexed by the code's number).
        self.handled = [0] * len(_CODES)
        self.latency = Histogram(LATENCY_BUCKETS)

    def finished(self, code: int, seconds: float) -> None:
        """Count a finished call."""
        self.handled[code] += 1
        self.latency.observe(seconds)

    @property
    def in_flight(self) -> int:
        """Started and not yet finished."""
        return self.started - sum(self.handled)


class MethodStats(CallStats):
    """What happened to one method of this server over one transport.

    Refused requests (rate limit, shedding) count as started and handled, with the
    status they were answered with, and in `refused` by reason; the latency and
    deadline histograms cover the requests that ran.
    """

    __slots__ = ("deadline", "refused")

    def __init__(self, full_method: str, kind: str, transport: str) -> None:
        super().__init__([*method_labels(full_method, kind), transport])
        self.deadline = Histogram(DEADLINE_BUCKETS)
        self.refused = dict.fromkeys(REASONS, 0)

    def refuse(self, reason: str, code: int) -> None:
        """Count a request refused before it ran."""
        self.started += 1
        self.handled[code] += 1
        self.refused[reason] += 1


class Metrics:
    """The service's metrics: per-method request stats and registered families.

    Build one per process in the composition root; `registry` is what `/metrics`
    serves (with the process and Python runtime collectors of prometheus_client).
    """

    def __init__(self, *, build: dict[str, str]) -> None:
        self._methods: list[MethodStats] = []
        self._clients: dict[tuple[str, str], CallStats] = {}
        self._sources: list[Families] = []
        self._build = build
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def method(self, full_method: str, kind: str, transport: str) -> MethodStats:
        """The stats of one method of this server over one transport."""
        stats = MethodStats(full_method, kind, transport)
        self._methods.append(stats)
        return stats

    def client(self, full_method: str, kind: str) -> CallStats:
        """The stats of the outbound calls of one method (created on first use)."""
        key = (full_method, kind)
        stats = self._clients.get(key)
        if stats is None:
            stats = self._clients[key] = CallStats(method_labels(full_method, kind))
        return stats

    def register(self, families: Families) -> None:
        """Add a source of families (a callable run at every scrape)."""
        self._sources.append(families)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        """Every family, built from the current counts."""
        yield from _server(self._methods)
        yield from _client(self._clients.values())
        yield from _runtime()
        info = GaugeMetricFamily(
            "service_build_info",
            "The service and the template release it was generated from; always 1.",
            labels=list(self._build),
        )
        info.add_metric(list(self._build.values()), 1)
        yield info
        for source in self._sources:
            yield from source()


def _calls(
    side: str, what: str, stats: Iterable[CallStats], labels: list[str]
) -> tuple[CounterMetricFamily, CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily]:
    """started, handled, handling_seconds and in-flight families of `side` (server, client)."""
    started = CounterMetricFamily(f"grpc_{side}_started", f"{what} started.", labels=labels)
    handled = CounterMetricFamily(
        f"grpc_{side}_handled", f"{what} completed, by status code.", labels=[*labels, "grpc_code"]
    )
    latency = HistogramMetricFamily(
        f"grpc_{side}_handling_seconds",
        f"{what}: time from start to status, in seconds.",
        labels=labels,
    )
    in_flight = GaugeMetricFamily(
        f"grpc_{side}_in_flight_requests", f"{what} started and not yet completed.", labels=labels
    )
    for one in stats:
        values = one.labels
        started.add_metric(values, one.started)
        done = 0
        for code, count in zip(_CODES, one.handled, strict=True):
            done += count
            if count:
                handled.add_metric([*values, code.name], count)
        latency.add_metric(values, one.latency.buckets(), one.latency.sum)
        in_flight.add_metric(values, one.started - done)
    return started, handled, latency, in_flight


def _server(methods: list[MethodStats]) -> Iterator[Metric]:
    labels = [*_LABELS, "transport"]
    yield from _calls("server", "Requests to this server", methods, labels)
    deadline = HistogramMetricFamily(
        "grpc_server_deadline_remaining_seconds",
        "Deadline left when a request started (the client's, else the default).",
        labels=labels,
    )
    refused = CounterMetricFamily(
        "grpc_server_refused",
        "Requests refused before they ran, by reason (rate_limit, shed).",
        labels=[*labels, "reason"],
    )
    for stats in methods:
        deadline.add_metric(stats.labels, stats.deadline.buckets(), stats.deadline.sum)
        for reason, count in stats.refused.items():
            if count:
                refused.add_metric([*stats.labels, reason], count)
    yield deadline
    yield refused


def _client(stats: Iterable[CallStats]) -> Iterator[Metric]:
    yield from _calls("client", "Calls from this service to others", stats, _LABELS)


def _runtime() -> Iterator[Metric]:
    tasks = GaugeMetricFamily("asyncio_tasks", "Tasks of the event loop not yet done.")
    try:
        tasks.add_metric([], len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the loop (a test)
        return
    yield tasks


class _Collector:
    """prometheus_client's view of `Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()


def build_labels(service: str, version: str, template: str) -> dict[str, str]:
    """Labels of `service_build_info`."""
    return {
        "service": service,
        "version": version,
        "template_version": template,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
