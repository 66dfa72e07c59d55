"""checkpoint.save_every_minutes: a save whenever that much wall-clock time passed since the last one.

Steps bound the work a fault costs in steps; at scale what matters is hours of a cluster, and a step's duration
changes with evaluations, compile and the world size after a shrink. Each rank only reads its own clock here;
the trainer folds the answer into the stop/save agreement between steps (titanlite.step_control: one MAX
all-reduce about once a second), so every rank saves at the same step, at most about a second past due.
"""

from __future__ import annotations

import time
from typing import Callable


def now() -> float:
    return time.monotonic()


class SaveClock:
    def __init__(self, minutes: float, clock: Callable[[], float] | None = None):
        self.period_s = minutes * 60.0 if minutes > 0 else None
        self._clock = clock or now
        self._last = self._clock()

    @property
    def enabled(self) -> bool:
        return self.period_s is not None

    def due(self) -> bool:
        """Whether this rank's clock says a save is due (the trainer makes the ranks agree)."""
        return self.period_s is not None and self._clock() - self._last >= self.period_s

    def reset(self) -> None:
        """Training begins, or a save (of any kind) just happened: the next one is due a full period later."""
        self._last = self._clock()
