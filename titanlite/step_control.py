"""Agreement between steps: did any rank get SIGTERM, has every rank finished its part of an async save, does any
rank's save clock (checkpoint.save_every_minutes) say a save is due.

Every rank must stop, save and publish at the same step, so the answer is one all-reduce (MAX) of a few ints over
a CPU group. It runs every few steps, not every step: at scale an all-reduce over every rank is a CPU-level
barrier whose latency grows with the world size. Rank 0 picks the next check so that checks come about
CHECK_PERIOD_S apart at its measured step time, and sends the interval inside the same all-reduce, so every rank
checks at the same steps. A preemption notice leaves tens of seconds (torchrun waits 30 s before SIGKILL), so a
check every second or so loses nothing.

Which group: the default one when it is already a CPU (gloo) group, so CPU runs open no extra group; on GPUs
(NCCL, where reading the flags back would sync the device every check) one gloo group, made once.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

CHECK_PERIOD_S = 1.0
MAX_CHECK_INTERVAL = 1000  # steps; tiny steps (tests, debug configs) still check now and then


class StepControl:
    def __init__(self, distributed: bool, is_main: bool, needed: bool):
        """distributed: a process group with several ranks; needed: SIGTERM handling, async saves or timed saves are on."""
        self.active = distributed and needed
        self.is_main = is_main
        self.group = None
        if self.active and dist.get_backend() != dist.Backend.GLOO:
            self.group = dist.new_group(backend="gloo")
        self.next_check = 0
        self.checks = 0  # all-reduces run (tests count them)
        self._last: tuple[int, float] | None = None  # (step, time) of rank 0's previous check

    def due(self, step: int) -> bool:
        return not self.active or step >= self.next_check

    def _interval(self, step: int) -> int:
        now = time.perf_counter()
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0]:
            return 1
        seconds_per_step = (now - last[1]) / (step - last[0])
        return max(1, min(MAX_CHECK_INTERVAL, int(CHECK_PERIOD_S / max(seconds_per_step, 1e-9))))

    def agree(self, step: int, stop: bool, unfinished: bool, timed: bool = False) -> tuple[bool, bool, bool]:
        """(any rank stopping, any rank's async save unfinished, any rank's save clock due); collective at a due
        step on every rank."""
        if not self.active:
            return stop, unfinished, timed
        interval = self._interval(step) if self.is_main else 0
        flags = torch.tensor([int(stop), int(unfinished), int(timed), interval], dtype=torch.int64)  # CPU: no sync
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        stop_any, unfinished_any, timed_any, interval = flags.tolist()
        self.next_check = step + max(1, interval)
        self.checks += 1
        return bool(stop_any), bool(unfinished_any), bool(timed_any)
