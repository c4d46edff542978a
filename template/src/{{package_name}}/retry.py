"""Retries inside the request deadline: exponential backoff, full jitter, a shared budget.

`Retry.run(attempt, retryable=..., budget=...)` runs `attempt` and retries it while
the error is retryable, attempts remain, the next attempt (and the sleep before
it) fits in what is left of the deadline (`deadlines.remaining()`), and the
dependency's `RetryBudget` allows one more retry. Cancellation is never retried
nor swallowed. Use one retry layer per dependency: layers multiply their attempts.
Imports only `deadlines` and `errors` from the service.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from . import deadlines
from .errors import DeadlineExceeded

T = TypeVar("T")

# Weight of a new duration in the estimate of how long a successful attempt takes.
_ESTIMATE_WEIGHT = 0.2
_BUDGET_SLOTS = 10


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry.

    The sleep before retry n (n = 1, 2, ...) is drawn uniformly from
    [0, min(max_backoff, initial_backoff * multiplier ** (n - 1))] (full jitter),
    and shortened to what leaves room for the next attempt. `min_attempt_time` is
    the least an attempt needs: no attempt starts with less left, nor a retry
    with less than what successful attempts recently took.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.025
    max_backoff: float = 0.5
    multiplier: float = 2.0
    min_attempt_time: float = 0.005

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if self.min_attempt_time < 0:
            raise ValueError("min_attempt_time must not be negative")


class RetryBudget:
    """Retries a dependency may get: `ratio` of its calls over a sliding window, plus a floor.

    Over the last `window` seconds, retries may number at most `ratio` times the
    calls plus `per_second * window`: when the dependency fails for everyone,
    retries add at most that fraction of load (not a multiple of it), while a
    quiet service can still retry now and then. Shared by every caller of one
    dependency; O(1) per call, no timers.
    """

    __slots__ = ("_calls", "_epoch", "_floor", "_retries", "_slot", "_width", "ratio")

    def __init__(
        self, *, ratio: float = 0.1, per_second: float = 5.0, window: float = 10.0
    ) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError("ratio must be in [0, 1]")
        if per_second < 0:
            raise ValueError("per_second must not be negative")
        if window <= 0:
            raise ValueError("window must be positive")
        self.ratio = ratio
        self._floor = per_second * window
        self._width = window / _BUDGET_SLOTS
        # Calls and retries per slot of the window; index 0 is the running total.
        self._calls = [0] * (_BUDGET_SLOTS + 1)
        self._retries = [0] * (_BUDGET_SLOTS + 1)
        self._epoch = 0
        self._slot = 1

    def record_call(self, now: float) -> None:
        """Count a call (its first attempt)."""
        self._advance(now)
        self._calls[0] += 1
        self._calls[self._slot] += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; False when none is left."""
        self._advance(now)
        if self._retries[0] + 1 > self.ratio * self._calls[0] + self._floor:
            return False
        self._retries[0] += 1
        self._retries[self._slot] += 1
        return True

    def _advance(self, now: float) -> None:
        epoch = math.floor(now / self._width)
        steps = min(epoch - self._epoch, _BUDGET_SLOTS)
        if steps <= 0:
            return  # the same slot (or a clock that went back: keep counting there)
        calls, retries, slot = self._calls, self._retries, self._slot
        for _ in range(steps):
            slot = slot % _BUDGET_SLOTS + 1
            calls[0] -= calls[slot]
            retries[0] -= retries[slot]
            calls[slot] = retries[slot] = 0
        self._slot, self._epoch = slot, epoch


@dataclass(slots=True)
class RetryStats:
    """Counters of one Retry, for metrics."""

    calls: int = 0
    retries: int = 0  # retries started
    recovered: int = 0  # calls that succeeded after at least one retry
    exhausted: int = 0  # gave up: no attempts left
    deadline: int = 0  # gave up: the next attempt would not fit in the deadline
    budget: int = 0  # gave up: the dependency's retry budget was spent
    not_retryable: int = 0  # failed with an error the predicate does not retry


class Retry:
    """Runs attempts against one dependency under a RetryPolicy.

    `clock`, `sleep`, `uniform` (a number in [0, 1) for the jitter) and `remaining`
    (seconds left of the deadline, None without one) are injectable for tests.
    """

    __slots__ = ("_estimate", "_remaining", "_sleep", "_uniform", "clock", "policy", "stats")

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        uniform: Callable[[], float] = random.random,
        remaining: Callable[[], float | None] = deadlines.remaining,
    ) -> None:
        self.policy = policy
        self.stats = RetryStats()
        self.clock = clock
        self._sleep = sleep
        self._uniform = uniform
        self._remaining = remaining
        self._estimate: float | None = None

    @property
    def attempt_time(self) -> float | None:
        """How long successful attempts recently took (None before the first)."""
        return self._estimate

    async def run(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        retryable: Callable[[Exception], bool],
        budget: RetryBudget,
    ) -> T:
        """Await `attempt()` until it succeeds or a retry is not allowed; return its result.

        Raises the last attempt's error when retrying stops, and DeadlineExceeded,
        before any attempt, when less than `min_attempt_time` is left.
        CancelledError propagates at once, from an attempt or a backoff sleep.
        """
        left = self.begin(budget)
        started = self.clock()
        try:
            result = await self._attempt(attempt, left)
        except Exception as error:  # noqa: BLE001 - resume re-raises what it does not retry
            return await self.resume(error, attempt, retryable=retryable, budget=budget)
        self.succeeded(started)
        return result

    def begin(self, budget: RetryBudget) -> float | None:
        """Count a call whose first attempt the caller runs itself; what is left of the deadline.

        `run` in pieces, for a hot path that cannot afford its coroutines: call
        `begin`, run the first attempt inline, then `succeeded(started)` with the
        clock reading from before it, or `resume(error, ...)` when it raised.
        Raises DeadlineExceeded when less than `min_attempt_time` is left.
        """
        self.stats.calls += 1
        budget.record_call(self.clock())
        left = self._remaining()
        if left is not None and left < max(self.policy.min_attempt_time, 1e-9):
            raise DeadlineExceeded("deadline too short to start the call")
        return left

    def succeeded(self, started: float) -> None:
        """A first attempt run by the caller succeeded; it started at `started` (`clock`)."""
        self._observe(self.clock() - started)

    async def resume(
        self,
        error: Exception,
        attempt: Callable[[], Awaitable[T]],
        *,
        retryable: Callable[[Exception], bool],
        budget: RetryBudget,
    ) -> T:
        """Go on after a first attempt failed with `error`: retry `attempt` as `run` does.

        Raises the last attempt's error when retrying stops.
        """
        policy = self.policy
        backoff = policy.initial_backoff
        attempts = 1
        while True:
            pause = self._pause(error, attempts, backoff, retryable, budget)
            if pause is None:
                raise error
            await self._sleep(pause)
            left = self._remaining()
            if left is not None and left < policy.min_attempt_time:
                self.stats.deadline += 1  # the sleep overran (a busy event loop)
                raise error
            self.stats.retries += 1
            backoff = min(backoff * policy.multiplier, policy.max_backoff)
            attempts += 1
            started = self.clock()
            try:
                result = await self._attempt(attempt, left)
            except Exception as failed:  # noqa: BLE001 - judged by _pause on the next turn
                error = failed
                continue
            self._observe(self.clock() - started)
            self.stats.recovered += 1
            return result

    def _pause(
        self,
        error: Exception,
        attempts: int,
        backoff: float,
        retryable: Callable[[Exception], bool],
        budget: RetryBudget,
    ) -> float | None:
        """The sleep before the next attempt, or None (counted) when there is none."""
        policy, stats = self.policy, self.stats
        if not retryable(error):
            stats.not_retryable += 1
            return None
        if attempts >= policy.max_attempts:
            stats.exhausted += 1
            return None
        room = math.inf
        left = self._remaining()
        if left is not None:
            # The next attempt needs what attempts recently took; the sleep gets the rest.
            room = left - max(policy.min_attempt_time, self._estimate or 0.0)
            if room <= 0:
                stats.deadline += 1
                return None
        if not budget.try_spend(self.clock()):
            stats.budget += 1
            return None
        return self._uniform() * min(backoff, room)

    def _observe(self, duration: float) -> None:
        estimate = self._estimate
        self._estimate = (
            duration if estimate is None else estimate + _ESTIMATE_WEIGHT * (duration - estimate)
        )

    async def _attempt(self, attempt: Callable[[], Awaitable[T]], left: float | None) -> T:
        """One attempt, held to the deadline when nothing else enforces it."""
        if left is None or deadlines.enforced():
            return await attempt()
        # Outside the request's own task (a spawned task, a job under a plain
        # deadlines.scope) nothing cancels the attempt at the deadline: do it here.
        timer = asyncio.timeout(left)
        try:
            async with timer:
                return await attempt()
        except TimeoutError as error:
            if timer.expired():
                raise DeadlineExceeded("deadline exceeded during the call") from error
            raise
