"""Optimizers: Muon (block matrices, distributed over FSDP2 shards) + AdamW (the rest) + schedules."""

from titanlite.optim.adamw import AdamW
from titanlite.optim.builder import build_optimizers
from titanlite.optim.container import OptimizersContainer
from titanlite.optim.muon import Muon
from titanlite.optim.schedules import TrainingSchedule

__all__ = ["AdamW", "Muon", "OptimizersContainer", "TrainingSchedule", "build_optimizers"]
