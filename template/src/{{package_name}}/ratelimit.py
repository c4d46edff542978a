"""Token-bucket rate limits per method and per caller; an over-limit call is refused, never queued.

Each bucket is kept as one number, its theoretical arrival time (the generic cell
rate algorithm, GCRA): the same admissions as a token bucket refilled `per_second`
up to `burst`, with no refill arithmetic and no timer. Callers pass `now` (a
monotonic time they already read). A leaf-level module: it imports nothing from
the service.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

# Float slack when comparing times: `now` is a monotonic clock that can be large, so
# a burst taken at one instant must not lose its last token to rounding. Admitting a
# call one microsecond early is harmless at any rate these buckets accept.
_SLACK = 1e-6
# Rates above this would be dominated by that slack (and are far beyond what one
# process serves).
MAX_PER_SECOND = 100_000.0
# Caller keys come from request metadata: longer ones are cut, so a hostile client
# cannot make one bucket cost more memory than this.
MAX_KEY_LENGTH = 128


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_second` sustained calls, with bursts of up to `burst` calls at once."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (0 < self.per_second <= MAX_PER_SECOND):
            raise ValueError(f"per_second must be in (0, {MAX_PER_SECOND:g}]")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")

    @property
    def interval(self) -> float:
        """Seconds between two tokens."""
        return 1.0 / self.per_second

    @property
    def tolerance(self) -> float:
        """How far ahead of `now` the arrival time may run: the burst, in seconds."""
        return (self.burst - 1) * self.interval


class TokenBucket:
    """One bucket. `try_acquire` takes a token, or says how long until there is one."""

    __slots__ = ("_interval", "_tat", "_tolerance", "rate")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._interval = rate.interval
        self._tolerance = rate.tolerance
        self._tat = -math.inf  # a full bucket

    def try_acquire(self, now: float) -> float:
        """0.0 when a token was taken; else the seconds until one is available."""
        tat = max(self._tat, now)
        wait = tat - now - self._tolerance
        if wait > _SLACK:
            return wait
        self._tat = tat + self._interval
        return 0.0

    def refund(self) -> None:
        """Give back the token of the last admitted call (it was refused elsewhere)."""
        self._tat -= self._interval


class KeyedTokenBuckets:
    """One bucket per key, for at most `max_keys` keys.

    The least recently used key is forgotten when a new one arrives at the limit, so
    a client inventing keys cannot grow memory; a forgotten key that comes back
    starts with a full bucket, as a new one would. Keys longer than MAX_KEY_LENGTH
    are cut to it.
    """

    __slots__ = ("_interval", "_max_keys", "_tats", "_tolerance", "rate")

    def __init__(self, rate: Rate, *, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self._interval = rate.interval
        self._tolerance = rate.tolerance
        self._max_keys = max_keys
        # Insertion order is recency: every access moves its key to the end.
        self._tats: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def try_acquire(self, key: str, now: float) -> float:
        """0.0 when `key` got a token; else the seconds until it has one."""
        key = key[:MAX_KEY_LENGTH]
        tats = self._tats
        previous = tats.get(key)
        if previous is None:
            if len(tats) >= self._max_keys:
                tats.popitem(last=False)
            tat = now
        else:
            tats.move_to_end(key)
            tat = max(previous, now)
        wait = tat - now - self._tolerance
        if wait > _SLACK:
            return wait
        tats[key] = tat + self._interval
        return 0.0

    def refund(self, key: str) -> None:
        """Give back the token `key` just took (its call was refused elsewhere)."""
        key = key[:MAX_KEY_LENGTH]
        if key in self._tats:
            self._tats[key] -= self._interval


class RateLimiter:
    """The rate limits of a service: one bucket per method, and optionally per caller.

    `methods` sets the rate of named methods (full gRPC names), `default` that of
    every other method (None: unlimited). `per_caller` gives each caller key its
    own bucket across all methods, at most `max_callers` of them. A call must get
    a token from both; a call refused by one takes nothing from the other.
    Methods are the service's own (the chain sees no unregistered ones), so the
    per-method buckets are as many as the service has methods.
    """

    __slots__ = ("_callers", "_default", "_methods", "_rates")

    def __init__(
        self,
        *,
        default: Rate | None,
        methods: Mapping[str, Rate | None] | None = None,
        per_caller: Rate | None = None,
        max_callers: int = 10_000,
    ) -> None:
        self._default = default
        self._rates = dict(methods or {})
        self._methods: dict[str, TokenBucket | None] = {}
        self._callers = (
            None if per_caller is None else KeyedTokenBuckets(per_caller, max_keys=max_callers)
        )

    def try_acquire(self, method: str, caller: str | None, now: float) -> float:
        """0.0 when the call may proceed; else the seconds the caller should wait.

        `caller` is the caller's identity (None: unknown, only the method's limit
        applies). Never waits.
        """
        callers = self._callers
        if callers is not None and caller is not None:
            wait = callers.try_acquire(caller, now)
            if wait:
                return wait
        bucket = self._bucket(method)
        if bucket is None:
            return 0.0
        wait = bucket.try_acquire(now)
        if wait and callers is not None and caller is not None:
            callers.refund(caller)
        return wait

    def _bucket(self, method: str) -> TokenBucket | None:
        try:
            return self._methods[method]
        except KeyError:
            rate = self._rates.get(method, self._default)
            bucket = self._methods[method] = None if rate is None else TokenBucket(rate)
            return bucket
