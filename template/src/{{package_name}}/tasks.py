"""asyncio tasks: a dump for live diagnosis, and the detection of task leaks.

A task leak is the asyncio analogue of a goroutine leak: work started with
`create_task` that never ends (a forgotten wait, a stream nobody reads), so the
number of tasks climbs with traffic. `TaskWatch.tick` runs on every sample of the
loop-lag sampler (no timer of its own) and counts `asyncio.all_tasks()` once per
`interval`; when the count
stays above its lowest recent value by more than a threshold for a while, it logs
one line with the most common creation sites, at most once per `quiet` seconds.

A creation site is the task's coroutine: its qualified name and the file and line
where that coroutine function is defined (`cr_code`), read only when a report is
due; nothing is traced per task. Imports nothing from the service.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_STACK_FRAMES = 12
_SITES = 5


def site(task: asyncio.Task[Any]) -> str:
    """`qualname (file:line)` of the coroutine function the task runs."""
    coro: object = task.get_coro()
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    if code is None:
        return type(coro).__qualname__
    return f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})"


def dump() -> list[dict[str, Any]]:
    """Every task of the running loop: name, coroutine, state and stack (innermost last)."""
    out = []
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        out.append(
            {
                "name": task.get_name(),
                "coroutine": site(task),
                "done": task.done(),
                "stack": [
                    f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_qualname}"
                    for frame in frames[-_STACK_FRAMES:]
                ],
            }
        )
    out.sort(key=lambda entry: (entry["coroutine"], entry["name"]))
    return out


def common_sites(limit: int = _SITES) -> list[tuple[str, int]]:
    """The creation sites with the most tasks now, most first."""
    counts = collections.Counter(site(task) for task in asyncio.all_tasks())
    return counts.most_common(limit)


class TaskWatch:
    """Reports sustained growth of the number of tasks, with its likely sources.

    The baseline is the lowest count seen over the last `window` seconds; growth is
    sustained when every sample for `sustain` seconds is more than `threshold`
    above it. A report is one WARNING line and `reports` counted; then nothing for
    `quiet` seconds however long the growth lasts.
    """

    __slots__ = (
        "_above_since",
        "_clock",
        "_low",
        "_low_at",
        "_next_report",
        "_next_sample",
        "interval",
        "quiet",
        "reports",
        "sustain",
        "threshold",
        "window",
    )

    def __init__(  # noqa: PLR0913 - keyword-only knobs, each defaulted but the threshold
        self,
        *,
        threshold: int,
        sustain: float = 10.0,
        window: float = 300.0,
        quiet: float = 300.0,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.interval = interval
        self._next_sample = 0.0
        self.threshold = threshold
        self.sustain = sustain
        self.window = window
        self.quiet = quiet
        self.reports = 0
        self._clock = clock
        self._low: int | None = None
        self._low_at = 0.0
        self._above_since: float | None = None
        self._next_report = 0.0

    def tick(self, _: float = 0.0) -> None:
        """Count the running loop's tasks if `interval` passed since the last count.

        Takes (and ignores) the loop-lag sample, so it can share that sampler.
        """
        now = self._clock()
        if now < self._next_sample:
            return
        self._next_sample = now + self.interval
        self.observe(len(asyncio.all_tasks()), now)

    def observe(self, count: int, now: float | None = None) -> bool:
        """Take one sample of the number of tasks; True when it made a report."""
        if now is None:
            now = self._clock()
        low = self._low
        if low is None or count <= low or now - self._low_at > self.window:
            # A new baseline: the lowest count lately (a window's old one expires).
            self._low, self._low_at = count, now
            self._above_since = None
            return False
        if count - low <= self.threshold:
            self._above_since = None
            return False
        if self._above_since is None:
            self._above_since = now
        if now - self._above_since < self.sustain or now < self._next_report:
            return False
        self._next_report = now + self.quiet
        self.reports += 1
        self.report(count, low, now - self._above_since)
        return True

    def report(self, count: int, baseline: int, lasted: float) -> None:
        """Log the growth and the most common creation sites."""
        try:
            sites = common_sites()
        except RuntimeError:  # no running loop (a test feeding samples by hand)
            sites = []
        log.warning(
            "asyncio tasks keep growing",
            extra={
                "tasks": count,
                "baseline": baseline,
                "threshold": self.threshold,
                "lasted_s": round(lasted, 1),
                "sites": [f"{where}: {n}" for where, n in sites],
            },
        )
