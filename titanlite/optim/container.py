"""The one object the trainer steps: AdamW + Muon + the schedule that drives them."""

from __future__ import annotations

from titanlite.optim.adamw import AdamW
from titanlite.optim.muon import Muon
from titanlite.optim.schedules import TrainingSchedule


class OptimizersContainer:
    """Steps AdamW and Muon once per training step with the scheduled LR, momentum and weight decay.

    Every group's LR is `initial_lr * lr_multiplier(step)`; Muon's momentum follows the momentum schedule and
    its weight decay is `initial_weight_decay * muon_weight_decay_factor(step)`. Stateful.
    """

    def __init__(self, adamw: AdamW | None, muon: Muon | None, schedule: TrainingSchedule):
        self.adamw, self.muon, self.schedule = adamw, muon, schedule
        self.optimizers = [opt for opt in (adamw, muon) if opt is not None]
        self._current = self._values_at(0)

    def _values_at(self, step_index: int) -> dict:
        muon_wd = 0.0
        if self.muon is not None and self.muon.param_groups:
            muon_wd = self.muon.param_groups[0]["initial_weight_decay"] * \
                self.schedule.muon_weight_decay_factor(step_index)
        return {"lrm": self.schedule.lr_multiplier(step_index),
                "momentum": self.schedule.muon_momentum(step_index), "muon_wd": muon_wd}

    def apply_schedule(self, step_index: int) -> None:
        """Set every group's hyperparameters for optimizer step `step_index` (0-based)."""
        values = self._values_at(step_index)
        wd_factor = self.schedule.muon_weight_decay_factor(step_index)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * values["lrm"]
        if self.muon is not None:
            for group in self.muon.param_groups:
                group["momentum"] = values["momentum"]
                group["weight_decay"] = group["initial_weight_decay"] * wd_factor
        self._current = values

    def step(self, step_index: int) -> None:
        self.apply_schedule(step_index)
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def current(self) -> dict:
        """{"lrm", "momentum", "muon_wd"} used by the latest step (for logging)."""
        return dict(self._current)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    # Stateful (Muon's state_dict is collective under FSDP: call on every rank).
    def state_dict(self) -> dict:
        state = {"schedule": self.schedule.state_dict()}
        if self.adamw is not None:
            state["adamw"] = self.adamw.state_dict()
        if self.muon is not None:
            state["muon"] = self.muon.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
