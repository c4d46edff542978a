"""Alarms: cancel a task when its deadline passes, one event-loop timer per tick for all.

Every request may need its deadline enforced, and an asyncio timer per request
(`asyncio.timeout`, `loop.call_at`) is a Python object, a copy of the context and a
heap entry that stays until its due time even when cancelled. Here alarms due in the
same tick share one loop timer and arming or disarming one is a list append or an
attribute write. The price is precision: an alarm fires up to one tick (1/64 s)
after its time, never before it.

A leaf module: it imports nothing from the service.
"""

from __future__ import annotations

import asyncio
from typing import Any

TICKS_PER_SECOND = 64


class Alarm:
    """One armed alarm. `disarm()` before the task finishes; `expired` once it fired."""

    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task: asyncio.Task[Any] | None = task
        self.expired = False

    def disarm(self) -> None:
        """Never fire (a no-op once fired)."""
        self.task = None


class Alarms:
    """The alarm clock of one event loop; create it inside that loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self._due: dict[int, list[Alarm]] = {}

    def arm(self, when: float, task: asyncio.Task[Any]) -> Alarm:
        """Cancel `task` at loop time `when` (within one tick after it) unless disarmed."""
        tick = int(when * TICKS_PER_SECOND) + 1
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = []
            self.loop.call_at(tick / TICKS_PER_SECOND, self._fire, tick)
        alarm = Alarm(task)
        due.append(alarm)
        return alarm

    def _fire(self, tick: int) -> None:
        for alarm in self._due.pop(tick, ()):
            task = alarm.task
            if task is not None:
                alarm.task = None
                alarm.expired = True
                task.cancel()

    def __len__(self) -> int:
        """Alarms armed and not yet due, disarmed ones included (they go at their tick)."""
        return sum(len(due) for due in self._due.values())
