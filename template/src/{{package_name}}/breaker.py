"""Circuit breaker per dependency: consecutive failures open it, one probe closes it.

CLOSED lets every call through and counts consecutive failures; `failures` of them
open it. OPEN refuses every call for `open_for` seconds, so callers fail fast with
UNAVAILABLE and the dependency gets room to recover. Then HALF_OPEN lets `probes`
calls through; that many successes close it, a failure opens it again.

Only the dependency's own failures count: cancellations, and deadline expiries of
our own budget, say nothing about it. Imports only `errors` from the service.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from types import TracebackType

from .errors import DeadlineExceeded, ServiceError, Unavailable


class State(enum.Enum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    """What a call through the breaker says about the dependency."""

    SUCCESS = "success"  # it answered (a NOT_FOUND is an answer too)
    FAILURE = "failure"  # it failed or was unreachable
    IGNORED = "ignored"  # nothing: cancelled, our own deadline ran out, never reached it


OnChange = Callable[[str, State, State], None]


class CircuitOpen(Unavailable):
    """The circuit of a dependency is open: the call failed fast, without reaching it.

    Never retry it: the breaker refuses calls on purpose.
    """


def outcome_of(error: BaseException | None) -> Outcome:
    """The outcome of a call that ended with `error` (None: it returned).

    UNAVAILABLE and connection-level errors are failures. Cancellation, a deadline
    exceeded (the request's budget ran out, whoever noticed first) and a call the
    breaker refused are ignored. Any other service error is an answer from the
    dependency, so a success; anything else is a bug of ours, ignored. Pass your
    own outcome to `record` where you know better: a pool that ran out of
    connections, say, is our congestion, not the database's failure.
    """
    if error is None:
        return Outcome.SUCCESS
    if isinstance(error, CircuitOpen | DeadlineExceeded | asyncio.CancelledError):
        return Outcome.IGNORED
    if isinstance(error, Unavailable | OSError | TimeoutError):
        return Outcome.FAILURE
    if isinstance(error, ServiceError):
        return Outcome.SUCCESS
    return Outcome.IGNORED


class Breaker:
    """The circuit breaker of one dependency, named `name` in its callbacks.

    Callers ask `allow(now)` before a call and `record(outcome, now)` after it, or
    wrap the call in `with breaker.guard():`. `on_change(name, old, new)` is called
    once for each transition.

    Recovery bound: once the dependency is healthy again, and while calls keep
    coming, the breaker closes within `open_for` + D + one healthy call, where D
    is the longest a call can take (the request deadline's maximum): a call sent
    before the recovery may still fail up to D later and open the circuit once
    more. A probe that has not reported for `open_for` is presumed lost and
    another is let through, so a caller that never records cannot hold the
    breaker half-open.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_in_trial",
        "_on_change",
        "_opened_at",
        "_probe_at",
        "_successes",
        "failures",
        "name",
        "open_for",
        "probes",
        "rejected",
        "state",
        "transitions",
    )

    def __init__(  # noqa: PLR0913 - keyword-only knobs, each defaulted
        self,
        name: str,
        *,
        failures: int = 5,
        open_for: float = 5.0,
        probes: int = 1,
        on_change: OnChange | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        if open_for <= 0:
            raise ValueError("open_for must be positive")
        if probes < 1:
            raise ValueError("probes must be at least 1")
        self.name = name
        self.failures = failures
        self.open_for = open_for
        self.probes = probes
        self.state = State.CLOSED
        # For metrics: calls refused (fail fast), and transitions by the state entered.
        self.rejected = 0
        self.transitions = dict.fromkeys(State, 0)
        self._on_change = on_change
        self._clock = clock
        self._failures = 0  # consecutive, while CLOSED
        self._opened_at = 0.0
        self._in_trial = 0  # probes let through and not yet recorded, while HALF_OPEN
        self._probe_at = 0.0  # when the last probe was let through
        self._successes = 0  # successful probes, while HALF_OPEN

    def allow(self, now: float) -> bool:
        """Whether a call may go to the dependency now (False: fail fast)."""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.OPEN:
            if now < self._opened_at + self.open_for:
                self.rejected += 1
                return False
            self._in_trial = self._successes = 0
            self._transition(State.HALF_OPEN)
        if self._in_trial >= self.probes:
            if now < self._probe_at + self.open_for:
                self.rejected += 1
                return False
            # A probe that has not reported for a whole open period is lost (its
            # caller never recorded it): let another through rather than stay
            # half-open forever.
            self._in_trial -= 1
        self._in_trial += 1
        self._probe_at = now
        return True

    def record(self, outcome: Outcome, now: float) -> None:
        """Count how a call that `allow` let through ended."""
        if outcome is Outcome.IGNORED:
            if self.state is State.HALF_OPEN and self._in_trial:
                self._in_trial -= 1  # the probe proved nothing: let another through
            return
        state = self.state
        if state is State.CLOSED:
            if outcome is Outcome.SUCCESS:
                self._failures = 0
                return
            self._failures += 1
            if self._failures >= self.failures:
                self._open(now)
        elif state is State.HALF_OPEN:
            if self._in_trial:
                self._in_trial -= 1
            if outcome is Outcome.FAILURE:
                self._open(now)
                return
            self._successes += 1
            if self._successes >= self.probes:
                self._failures = 0
                self._transition(State.CLOSED)
        # OPEN: a call let through before the circuit opened; its result is stale.

    def guard(self) -> Guard:
        """`with breaker.guard():` around one call to the dependency.

        Raises CircuitOpen, before the call, when the breaker refuses it; records
        the call's outcome (`outcome_of`) when the block ends. Reads the clock
        the breaker was given.
        """
        return Guard(self)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._failures = 0
        self._transition(State.OPEN)

    def _transition(self, new: State) -> None:
        old, self.state = self.state, new
        self.transitions[new] += 1
        if self._on_change is not None:
            self._on_change(self.name, old, new)


class Guard:
    """The `with` of `Breaker.guard()`."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        breaker = self._breaker
        if not breaker.allow(breaker._clock()):  # noqa: SLF001 - the breaker's own helper
            raise CircuitOpen(f"{breaker.name} unavailable (circuit open)")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        breaker = self._breaker
        breaker.record(outcome_of(exc), breaker._clock())  # noqa: SLF001
