"""Load shedding: an adaptive concurrency limit under a hard cap on requests in flight.

`Shedder.try_acquire` admits a request or refuses it at once, never queues;
`Shedder.release` ends it and feeds its latency and outcome to the limit. The
limit (`GradientLimit`) follows latency against the service's no-load latency and
the event loop's lag, once per window rather than per call. Callers pass `now`,
the monotonic time they read for the request. Imports only `errors` from the
service.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

from .errors import Code


class Outcome(enum.Enum):
    """How an admitted request ended, as the limit sees it."""

    OK = "ok"  # it finished: its latency is a sample of the service time
    DROPPED = "dropped"  # overload: its deadline passed, or a limit refused it downstream
    IGNORED = "ignored"  # says nothing about load: the client cancelled, a bug, a dependency down


_DROPPED = frozenset({Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED})
# UNAVAILABLE mostly means a dependency is down or its circuit open: failing fast
# says nothing about this process's capacity, and cutting the limit for it would only
# slow the recovery once the dependency is back.
_IGNORED = frozenset({Code.CANCELLED, Code.UNKNOWN, Code.INTERNAL, Code.UNAVAILABLE})


def outcome_of(code: Code) -> Outcome:
    """The outcome of a request that ended with `code`.

    Answers such as NOT_FOUND or INVALID_ARGUMENT are OK: the service did its work,
    and the time it took is a sample like any other.
    """
    if code in _DROPPED:
        return Outcome.DROPPED
    if code in _IGNORED:
        return Outcome.IGNORED
    return Outcome.OK


# The limit never falls below this fraction of itself in one window on latency alone.
_MIN_GRADIENT = 0.5
# Window means are remembered in this many slots over `probe_interval`, so the
# no-load latency forgets old minima as time goes by.
_BASELINE_SLOTS = 10
# Weight of a new sample in the service-time average.
_SERVICE_TIME_WEIGHT = 0.1


class GradientLimit:
    """A concurrency limit that follows the latency gradient and the event loop's lag.

    Per window of `window` seconds with at least `min_samples` finished requests:

    - a dropped request (deadline exceeded, overload downstream) or an event-loop
      lag of `lag_threshold` or more: the limit is multiplied by `backoff`;
    - else, with `mean` the window's mean latency and `baseline` the no-load
      latency, `gradient = tolerance * baseline / mean`: below 1 (requests queue),
      the limit is multiplied by it (at least 0.5); at 1 or above, it grows by its
      square root, but only while requests actually used at least half of it.

    So it cuts within a window when latency rises or the loop lags, and grows back
    additively. With the system at capacity C, latency is in-flight / C, and the
    limit settles near `tolerance * baseline * C`: the in-flight count that keeps
    latency within `tolerance` times the no-load latency.

    The baseline is the smallest window mean over the last `probe_interval`. While
    the limit binds, every window's requests queue, so no window shows the no-load
    latency any more and the baseline would creep up with the queue. So when the
    limit binds and `probe_interval` has passed since the last probe, it probes
    (as Envoy's adaptive concurrency filter does): the limit drops to `minimum`
    until `min_samples` requests admitted since then finished (at most
    `probe_time`), and their mean latency becomes the baseline. A dependency that
    became slower for good is learnt the same way.
    """

    __slots__ = (
        "_busiest",
        "_count",
        "_drops",
        "_epoch",
        "_lag",
        "_minima",
        "_next_probe",
        "_probe_count",
        "_probe_end",
        "_probe_start",
        "_probe_sum",
        "_resume",
        "_slot_width",
        "_sum",
        "_window_end",
        "backoff",
        "lag_threshold",
        "limit",
        "maximum",
        "min_samples",
        "minimum",
        "probe_interval",
        "probe_time",
        "tolerance",
        "window",
    )

    def __init__(  # noqa: PLR0913 - each knob is documented and validated
        self,
        *,
        initial: int = 20,
        minimum: int = 4,
        maximum: int = 1000,
        window: float = 0.1,
        min_samples: int = 10,
        tolerance: float = 2.0,
        backoff: float = 0.8,
        probe_interval: float = 30.0,
        probe_time: float = 1.0,
        lag: Callable[[], float] | None = None,
        lag_threshold: float = 0.05,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        if window <= 0 or probe_interval < window:
            raise ValueError("need 0 < window <= probe_interval")
        if probe_time <= 0:
            raise ValueError("probe_time must be positive")
        if min_samples < 1:
            raise ValueError("min_samples must be at least 1")
        if tolerance < 1:
            raise ValueError("tolerance must be at least 1")
        if not 0 < backoff < 1:
            raise ValueError("backoff must be in (0, 1)")
        if lag_threshold < 0:
            raise ValueError("lag_threshold must be 0 (off) or positive")
        # The limit in force; during a probe `minimum`, with the limit to return to
        # in `_resume`.
        self.limit = float(initial)
        self.minimum = minimum
        self.maximum = maximum
        self.window = window
        self.min_samples = min_samples
        self.tolerance = tolerance
        self.backoff = backoff
        self.probe_interval = probe_interval
        self.probe_time = probe_time
        self.lag_threshold = lag_threshold
        self._lag = lag
        self._window_end = -math.inf
        self._count = 0
        self._sum = 0.0
        self._drops = 0
        self._busiest = 0
        self._slot_width = probe_interval / _BASELINE_SLOTS
        self._minima = [math.inf] * _BASELINE_SLOTS
        self._epoch = -1
        self._resume: float | None = None
        self._next_probe = -math.inf
        self._probe_start = self._probe_end = 0.0
        self._probe_count = 0
        self._probe_sum = 0.0

    @property
    def probing(self) -> bool:
        """Whether the limit is held at `minimum` to measure the no-load latency."""
        return self._resume is not None

    @property
    def baseline(self) -> float | None:
        """The no-load latency as now estimated (None before the first full window)."""
        smallest = min(self._minima)
        return None if smallest == math.inf else smallest

    def sample(self, latency: float, in_flight: int, now: float) -> None:
        """A request finished in `latency` seconds with `in_flight` requests running."""
        if self._resume is not None:
            # Only requests admitted during the probe ran without the old queue.
            if now - latency >= self._probe_start:
                self._probe_count += 1
                self._probe_sum += latency
            if self._probe_count >= self.min_samples:
                self._end_probe(now)
            return
        self._count += 1
        self._sum += latency
        self._busiest = max(self._busiest, in_flight)
        self.tick(now)

    def drop(self, in_flight: int, now: float) -> None:
        """A request was dropped for overload with `in_flight` requests running."""
        if self._resume is not None:
            return  # the limit is at its minimum already
        self._drops += 1
        self._busiest = max(self._busiest, in_flight)
        self.tick(now)

    def tick(self, now: float) -> None:
        """Close the window if it is over (also called when requests arrive)."""
        if now < self._window_end:
            return
        if self._resume is not None:
            self._end_probe(now)  # out of probe time
            return
        if self._window_end == -math.inf:  # the first call
            self._window_end = now + self.window
            return
        binding = self._busiest >= self.limit
        if binding and now >= self._next_probe:
            self._start_probe(now)
            return
        if self._drops or self._lagging():
            self.limit = max(self.minimum, self.limit * self.backoff)
        elif self._count >= self.min_samples:
            mean = self._sum / self._count
            baseline = self._record(mean, now)
            gradient = self.tolerance * baseline / mean if mean > 0 else 1.0
            if gradient < 1:
                self.limit = max(self.minimum, self.limit * max(gradient, _MIN_GRADIENT))
            elif self._busiest * 2 >= self.limit:
                self.limit = min(self.maximum, self.limit + math.sqrt(self.limit))
        else:
            # Too few samples to judge: they carry over into the next window.
            self._window_end = now + self.window
            return
        self._next_window(now)

    def _next_window(self, now: float) -> None:
        self._window_end = now + self.window
        self._count = self._drops = self._busiest = 0
        self._sum = 0.0

    def _lagging(self) -> bool:
        return self._lag is not None and 0 < self.lag_threshold <= self._lag()

    def _start_probe(self, now: float) -> None:
        self._resume = self.limit
        self.limit = float(self.minimum)
        self._probe_start = now
        self._probe_count = 0
        self._probe_sum = 0.0
        # tick() ends the probe when its time is up.
        self._window_end = now + self.probe_time

    def _end_probe(self, now: float) -> None:
        resume = self._resume
        if resume is None:
            return
        if self._probe_count:
            self._minima = [math.inf] * _BASELINE_SLOTS
            self._record(self._probe_sum / self._probe_count, now)
        self.limit = resume
        self._resume = None
        self._next_probe = now + self.probe_interval
        self._next_window(now)

    def _record(self, mean: float, now: float) -> float:
        """Record a window mean; returns the smallest one over the probe interval."""
        epoch = int(now // self._slot_width)
        minima = self._minima
        if epoch > self._epoch:
            # Forget the slots time slid past (all of them after a long pause).
            for passed in range(max(self._epoch + 1, epoch - _BASELINE_SLOTS + 1), epoch + 1):
                minima[passed % _BASELINE_SLOTS] = math.inf
            self._epoch = epoch
        slot = self._epoch % _BASELINE_SLOTS
        minima[slot] = min(minima[slot], mean)
        return min(minima)


class Permit:
    """An admitted request's claim on the shedder; `Shedder.release` ends it once."""

    __slots__ = ("released", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.released = False


class Throughput:
    """Requests finished per second, per window of `window` seconds.

    `rate` is a moving average; `capacity` the highest recent rate, which decays by
    half every `half_life` seconds. Under light load requests finish as they arrive,
    so the rate says how busy the service was, not how much it can do: the decaying
    peak keeps what it did at its busiest, so a burst after a quiet spell is judged
    by the capacity last seen rather than by the quiet spell.
    """

    __slots__ = (
        "_count",
        "_window_end",
        "_window_start",
        "capacity",
        "half_life",
        "rate",
        "window",
    )

    def __init__(self, *, window: float = 0.25, half_life: float = 30.0) -> None:
        if window <= 0 or half_life <= 0:
            raise ValueError("window and half_life must be positive")
        self.window = window
        self.half_life = half_life
        # Requests per second; 0.0 until the first window closed.
        self.rate = 0.0
        self.capacity = 0.0
        self._count = 0
        self._window_start = -math.inf
        self._window_end = -math.inf

    def finished(self, now: float) -> None:
        """Count one finished request."""
        if now >= self._window_end:
            start = self._window_start
            if start != -math.inf:
                elapsed = now - start
                measured = self._count / elapsed
                rate = self.rate
                self.rate = measured if rate == 0.0 else rate + _RATE_WEIGHT * (measured - rate)
                decayed = self.capacity * 0.5 ** (elapsed / self.half_life)
                self.capacity = max(decayed, self.rate)
            self._window_start = now
            self._window_end = now + self.window
            self._count = 0
        self._count += 1


# Weight of a window's rate in the throughput average.
_RATE_WEIGHT = 0.3


class Shedder:
    """Admission: a hard cap on requests in flight, and adaptive limits under it.

    `try_acquire` never waits: it returns a Permit or None (refuse the request now).
    Every Permit must be released exactly once, whatever happens to the request
    (release it in a `finally`: a cancelled request releases as IGNORED); releasing
    it again does nothing, so capacity is never counted twice or lost.

    Two adaptive limits, each optional:

    - `deadline_fraction`: a request is refused when the wait it would see (by
      Little's law the requests in flight over the throughput the service recently
      reached, `Throughput.capacity`, plus the event loop's current lag: a saturated
      loop delays everything by that much) is more than that fraction of what is
      left of its deadline. Under overload the requests
      admitted are the ones that can still finish in time; with long deadlines (or
      none) nothing is refused until the hard cap, however many requests a client
      keeps in flight.
    - `adaptive`: the latency-gradient limit (`GradientLimit`), which keeps latency
      near its no-load value, for services where latency matters more than
      throughput.
    """

    __slots__ = (
        "_adaptive",
        "_deadline_fraction",
        "_in_flight",
        "_lag",
        "_service_time",
        "_throughput",
        "admitted",
        "max_in_flight",
        "rejected",
    )

    def __init__(
        self,
        *,
        max_in_flight: int = 1000,
        adaptive: GradientLimit | None,
        deadline_fraction: float = 0.0,
        lag: Callable[[], float] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not 0 <= deadline_fraction <= 1:
            raise ValueError("deadline_fraction must be in [0, 1] (0: off)")
        self.max_in_flight = max_in_flight
        self._adaptive = adaptive
        self._deadline_fraction = deadline_fraction
        self._lag = lag
        self._throughput = Throughput()
        self._in_flight = 0
        self._service_time: float | None = None
        self.admitted = 0
        self.rejected = 0

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet released."""
        return self._in_flight

    @property
    def limit(self) -> float:
        """The current limit on requests in flight (the deadline rule aside)."""
        adaptive = self._adaptive
        if adaptive is None:
            return float(self.max_in_flight)
        return min(float(self.max_in_flight), adaptive.limit)

    @property
    def service_time(self) -> float | None:
        """Recent mean latency of requests that finished (None before the first)."""
        return self._service_time

    @property
    def throughput(self) -> float:
        """Requests finished per second recently (0.0 before the first window)."""
        return self._throughput.rate

    def expected_wait(self) -> float:
        """What a request admitted now would wait (0.0 when unknown).

        The requests in flight over the capacity (Little's law), plus the event
        loop's lag.
        """
        capacity = self._throughput.capacity
        lag = 0.0 if self._lag is None else self._lag()
        return (self._in_flight / capacity if capacity > 0 else 0.0) + lag

    def try_acquire(self, now: float, remaining: float | None = None) -> Permit | None:
        """Admit a request (a Permit to release) or refuse it (None). Never waits.

        `remaining`: seconds left of the request's deadline, for the deadline rule.
        """
        adaptive = self._adaptive
        in_flight = self._in_flight
        if adaptive is not None:
            adaptive.tick(now)
            if in_flight >= adaptive.limit:
                self.rejected += 1
                return None
        if in_flight >= self.max_in_flight:
            self.rejected += 1
            return None
        fraction = self._deadline_fraction
        if fraction and remaining is not None and in_flight:
            capacity = self._throughput.capacity
            lag = 0.0 if self._lag is None else self._lag()
            if capacity > 0 and in_flight / capacity + lag > remaining * fraction:
                self.rejected += 1
                return None
        self._in_flight = in_flight + 1
        self.admitted += 1
        return Permit(now)

    def release(self, permit: Permit, now: float, outcome: Outcome) -> None:
        """End an admitted request; a second release of the same permit does nothing."""
        if permit.released:
            return
        permit.released = True
        in_flight = self._in_flight
        self._in_flight = in_flight - 1
        self._throughput.finished(now)
        if outcome is Outcome.OK:
            latency = max(now - permit.started, 0.0)
            service_time = self._service_time
            self._service_time = (
                latency
                if service_time is None
                else service_time + _SERVICE_TIME_WEIGHT * (latency - service_time)
            )
            if self._adaptive is not None:
                self._adaptive.sample(latency, in_flight, now)
        elif outcome is Outcome.DROPPED and self._adaptive is not None:
            self._adaptive.drop(in_flight, now)
