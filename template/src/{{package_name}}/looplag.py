"""Event-loop lag: how late a short periodic sleep wakes up, sampled by one task.

A saturated event loop runs every ready callback before it gets back to its
timers, so the lateness of a short sleep is how long any work now waits for the
loop: in one asyncio process, the CPU signal that means something (CPU use says
little once the loop is the bottleneck). One task per process samples it; readers
only read two floats. Imports nothing from the service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class LoopLag:
    """The event loop's recent lag, in seconds.

    `lag()` is the smaller of the last two samples: lag that lasts, not a single
    late wake-up (a garbage collection, one slow callback). Sampling runs in
    `run()`, usually through `monitor()`.
    """

    __slots__ = ("_clock", "_latest", "_previous", "_record", "interval")

    def __init__(
        self,
        *,
        interval: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        record: Callable[[float], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        # Called with every sample (a metrics histogram's `observe`).
        self._record = record
        self._clock = clock
        self._latest = 0.0
        self._previous = 0.0

    @classmethod
    @asynccontextmanager
    async def monitor(
        cls, *, interval: float = 0.05, record: Callable[[float], None] | None = None
    ) -> AsyncIterator[LoopLag]:
        """Sample the running loop's lag for the block; the sampling task ends with it."""
        lag = cls(interval=interval, record=record)
        task = asyncio.create_task(lag.run(), name="loop-lag")
        try:
            yield lag
        finally:
            task.cancel()
            # wait(), not `await task`: the task's CancelledError is its own, while a
            # cancellation of this task must still propagate.
            await asyncio.wait([task])

    def lag(self) -> float:
        """Lateness of the loop that lasted for two samples in a row, in seconds."""
        return min(self._latest, self._previous)

    @property
    def latest(self) -> float:
        """The last sample, spikes included (for metrics)."""
        return self._latest

    def observe(self, lateness: float) -> None:
        """Record one sample: a wake-up `lateness` seconds late."""
        self._previous = self._latest
        self._latest = lateness = max(lateness, 0.0)
        if self._record is not None:
            self._record(lateness)

    async def run(self) -> None:
        """Sample forever, every `interval` seconds; cancel to stop."""
        clock, interval = self._clock, self.interval
        while True:
            due = clock() + interval
            await asyncio.sleep(interval)
            self.observe(clock() - due)
