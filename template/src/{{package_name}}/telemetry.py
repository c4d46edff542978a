"""What each part of the service reports at `/metrics`, read when Prometheus scrapes.

The parts keep plain counters and expose their state (no prometheus_client below
this module and metrics.py); the functions here register, with `Metrics.register`,
the families built from them at scrape time. The composition root calls one per
part it built: a part that is switched off registers nothing, so its metrics are
absent rather than zero. Names and labels are listed in docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .breaker import Breaker, State
from .chain import Admission
from .db import Database
from .logs import Sink
from .metrics import LAG_BUCKETS, Histogram, Metrics
from .retry import Retry


def admission(metrics: Metrics, admitted: Admission) -> None:
    """Load shedding's state (refusals are counted per method by the chain)."""
    shedder = admitted.shedder
    if shedder is None:
        return

    def families() -> Iterator[Metric]:
        yield _gauge(
            "load_shedding_in_flight", "Requests admitted and not yet finished.", shedder.in_flight
        )
        yield _gauge(
            "load_shedding_limit",
            "The current limit on requests in flight (SHEDDING__MAX_IN_FLIGHT, or the "
            "adaptive limit under it).",
            shedder.limit,
        )
        yield _gauge(
            "load_shedding_expected_wait_seconds",
            "The wait a request admitted now would see: in flight over capacity, plus "
            "the event loop's lag.",
            shedder.expected_wait(),
        )

    metrics.register(families)


def loop_lag(metrics: Metrics) -> Callable[[float], None]:
    """The `record` of LoopLag.monitor: every sample of the event loop's lag."""
    histogram = Histogram(LAG_BUCKETS)

    def families() -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "event_loop_lag_seconds",
            "How late the event loop ran a short periodic sleep (a sample every "
            "SHEDDING__LAG_INTERVAL), in seconds.",
        )
        family.add_metric([], histogram.buckets(), histogram.sum)
        yield family

    metrics.register(families)
    return histogram.observe


def log_output(metrics: Metrics, sink: Sink) -> None:
    """Log lines dropped because nobody read the output fast enough."""

    def families() -> Iterator[Metric]:
        family = CounterMetricFamily(
            "log_lines_dropped", "Log lines dropped because the output was not read in time."
        )
        family.add_metric([], sink.dropped_total)
        yield family

    metrics.register(families)


def breakers(metrics: Metrics, named: Callable[[], dict[str, Breaker]]) -> None:
    """State, transitions and refusals of circuit breakers, by dependency."""

    def families() -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "circuit_breaker_state",
            "1 for the state each breaker is in (closed, open, half_open), else 0.",
            labels=["dependency", "state"],
        )
        transitions = CounterMetricFamily(
            "circuit_breaker_transitions",
            "Transitions of each breaker, by the state entered.",
            labels=["dependency", "state"],
        )
        rejected = CounterMetricFamily(
            "circuit_breaker_rejected",
            "Calls failed fast, without reaching the dependency, by an open breaker.",
            labels=["dependency"],
        )
        for name, breaker in named().items():
            for one in State:
                state.add_metric([name, one.value], 1.0 if breaker.state is one else 0.0)
                transitions.add_metric([name, one.value], breaker.transitions[one])
            rejected.add_metric([name], breaker.rejected)
        yield from (state, transitions, rejected)

    metrics.register(families)


def retries(metrics: Metrics, named: Callable[[], dict[str, Retry]]) -> None:
    """Calls under a retry policy, the retries they made and how they ended."""

    def families() -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "retry_calls", "Calls made under a retry policy.", labels=["dependency"]
        )
        attempts = CounterMetricFamily(
            "retry_attempts", "Retries started (attempts after the first).", labels=["dependency"]
        )
        outcomes = CounterMetricFamily(
            "retry_outcomes",
            "Calls that failed at least once, by how they ended: recovered (a retry "
            "succeeded), exhausted (no attempts left), deadline (the next attempt would "
            "not fit), budget (the retry budget was spent), not_retryable.",
            labels=["dependency", "outcome"],
        )
        for name, retry in named().items():
            stats = retry.stats
            calls.add_metric([name], stats.calls)
            attempts.add_metric([name], stats.retries)
            for outcome, count in (
                ("recovered", stats.recovered),
                ("exhausted", stats.exhausted),
                ("deadline", stats.deadline),
                ("budget", stats.budget),
                ("not_retryable", stats.not_retryable),
            ):
                outcomes.add_metric([name, outcome], count)
        yield from (calls, attempts, outcomes)

    metrics.register(families)


def pool(metrics: Metrics, db: Database) -> None:
    """The PostgreSQL connection pool: occupancy, waits, replacements, long-held leases."""
    leases = db.leases

    def families() -> Iterator[Metric]:
        stats = db.stats()
        yield _gauge("db_pool_size", "Open connections of the pool.", stats["size"])
        yield _gauge("db_pool_idle", "Open connections not in use.", stats["idle"])
        yield _gauge(
            "db_pool_in_use", "Connections in use (open less idle).", stats["size"] - stats["idle"]
        )
        yield _gauge("db_pool_max_size", "The pool's bound (DB__MAX_SIZE).", stats["max"])
        yield _gauge(
            "db_pool_waiting",
            "Requests waiting for a connection (a free one, or a new one being opened).",
            leases.waiting,
        )
        wait = HistogramMetricFamily(
            "db_pool_acquire_seconds", "How long requests waited for a connection, in seconds."
        )
        wait.add_metric([], leases.wait.buckets(), leases.wait.sum)
        yield wait
        yield _counter(
            "db_pool_held_too_long",
            "Connections held longer than DB__HELD_TOO_LONG, each counted once.",
            leases.held_too_long,
        )
        yield _counter(
            "db_pool_connections_opened",
            "Connections the pool opened: the first ones and every replacement.",
            leases.opened,
        )
        dropped = CounterMetricFamily(
            "db_pool_connections_dropped",
            "Connections dropped: lost (died under a statement: a terminated backend, a "
            "restart, a failover) or unreleased (not clean in time after a failed block).",
            labels=["reason"],
        )
        dropped.add_metric(["lost"], leases.lost)
        dropped.add_metric(["unreleased"], leases.discarded)
        yield dropped

    metrics.register(families)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
