"""The per-step schedules: LR multiplier, Muon momentum, Muon weight-decay factor.

All three are pure functions of the optimizer step `it` (0 .. num_iterations - 1) and the `lr_scheduler`
config, so resuming needs only the step; the object is still Stateful so a checkpoint records the horizon it
was trained with and a resume with a different horizon is visible in the log.

LR (docs/recipe.md §4 / seed-era ratios §12):
    it < warmup                 -> (it + 1) / warmup
    it <= N - warmdown          -> 1.0
    else  p = (N - it) / warmdown -> p + (1 - p) * final_lr_frac
Muon momentum (§3.5): linear start -> peak over momentum_warmup_steps (this branch wins for short runs),
then peak, then linear peak -> final over the LR warmdown.
Muon weight decay factor: cosine 1 -> 0 over the run (or linear, or constant 1).
"""

from __future__ import annotations

import math

from titanlite.errors import UserError
from titanlite.logging_utils import logger

_WD_SCHEDULES = ("cosine", "linear", "constant")


class TrainingSchedule:
    """LR multiplier, Muon momentum and Muon WD factor at each optimizer step."""

    def __init__(self, lr_scheduler_cfg, num_iterations: int):
        cfg = lr_scheduler_cfg
        if num_iterations < 1:
            raise UserError(f"the training horizon is {num_iterations} steps; it must be at least 1 "
                            "(set training.num_iterations, target_flops or target_param_data_ratio)")
        if cfg.muon_wd_schedule not in _WD_SCHEDULES:
            raise UserError(f"lr_scheduler.muon_wd_schedule = {cfg.muon_wd_schedule!r} is unknown; "
                            f"use one of {', '.join(_WD_SCHEDULES)}")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            value = getattr(cfg, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"lr_scheduler.{name} = {value} must lie in [0, 1]")
        self.num_iterations = int(num_iterations)
        # Python round(), as the reference does (banker's rounding on exact halves).
        self.warmup_steps = int(cfg.warmup_steps) if cfg.warmup_steps >= 0 else round(cfg.warmup_ratio * num_iterations)
        self.warmdown_steps = round(cfg.warmdown_ratio * num_iterations)
        self.warmdown_start = self.num_iterations - self.warmdown_steps
        self.final_lr_frac = float(cfg.final_lr_frac)
        self.momentum_warmup_steps = int(cfg.momentum_warmup_steps)
        self.momentum_start = float(cfg.momentum_start)
        self.momentum_peak = float(cfg.momentum_peak)
        self.momentum_final = float(cfg.momentum_final)
        self.muon_wd_schedule = cfg.muon_wd_schedule

    def lr_multiplier(self, it: int) -> float:
        if it < self.warmup_steps:
            return (it + 1) / self.warmup_steps
        if it <= self.warmdown_start:
            return 1.0
        progress = (self.num_iterations - it) / self.warmdown_steps
        return progress + (1.0 - progress) * self.final_lr_frac

    def muon_momentum(self, it: int) -> float:
        if it < self.momentum_warmup_steps:
            frac = it / self.momentum_warmup_steps
            return self.momentum_start * (1.0 - frac) + self.momentum_peak * frac
        if self.warmdown_steps > 0 and it >= self.warmdown_start:
            frac = (it - self.warmdown_start) / self.warmdown_steps
            return self.momentum_peak * (1.0 - frac) + self.momentum_final * frac
        return self.momentum_peak

    def muon_weight_decay_factor(self, it: int) -> float:
        if self.muon_wd_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * it / self.num_iterations))
        if self.muon_wd_schedule == "linear":
            return 1.0 - it / self.num_iterations
        return 1.0

    # Stateful: the values are derived from config + step, so the state only records the horizon.
    def state_dict(self) -> dict:
        return {"num_iterations": self.num_iterations, "warmup_steps": self.warmup_steps,
                "warmdown_steps": self.warmdown_steps}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: int(v) for k, v in state.items()}
        if saved != self.state_dict():
            logger.warning(f"LR schedule differs from the checkpoint's ({saved}); continuing with the current "
                           f"one ({self.state_dict()})")
