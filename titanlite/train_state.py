"""The trainer's own resumable state: where the loop is, what it has seen, how long it took, best val_bpb."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    step: int = 0                       # optimizer steps completed
    tokens_seen: int = 0
    total_training_time: float = 0.0    # seconds of steps after the first 10, evaluation excluded
    ema_loss: float = 0.0               # raw EMA; the printed value is debiased by `ema_updates`
    ema_updates: int = 0
    last_val_bpb: float = math.nan
    min_val_bpb: float = math.inf
    last_core: float = math.nan

    EMA_BETA = 0.9

    def update_loss(self, loss: float) -> float:
        """Fold a step loss into the EMA and return the debiased value (docs/recipe.md §9.3)."""
        self.ema_loss = self.EMA_BETA * self.ema_loss + (1 - self.EMA_BETA) * loss
        self.ema_updates += 1
        return self.ema_loss / (1 - self.EMA_BETA ** self.ema_updates)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, type(getattr(self, key))(value))
