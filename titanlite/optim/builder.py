"""build_optimizers: AdamW for the spec's AdamW groups, Muon (by shape) for its Muon group, and the schedule.

Which groups exist and their LR/betas/weight decay come from the model family's TrainSpec (plan.groups, the
same numbers the plan prints); this file only turns them into optimizers.
"""

from __future__ import annotations

import torch

from titanlite.config.sections import LRSchedulerConfig
from titanlite.optim.adamw import AdamW
from titanlite.optim.container import OptimizersContainer
from titanlite.optim.muon import Muon
from titanlite.optim.schedules import TrainingSchedule
from titanlite.precision import cpu_has_native_bf16
from titanlite.spec import ADAMW, MUON, GroupSettings

ADAM_EPS = 1e-10
MUON_GROUP = "matrices"


def build_optimizers(param_groups: dict[str, list[torch.nn.Parameter]], optimizer_cfg, plan_like,
                     lr_scheduler_cfg=None, *, compute_dtype: torch.dtype | None = None,
                     groups: dict[str, GroupSettings] | None = None) -> OptimizersContainer:
    """Optimizers for a model's `optimizer_param_groups()`.

    groups: each group's settings (default: plan_like.groups, as scaling.derive_plan computes them).
    plan_like: anything with num_iterations (and groups when `groups` is not given).
    lr_scheduler_cfg: the `lr_scheduler` section (defaults when None). compute_dtype: Muon orthogonalises in
    bf16 when it is bf16 and the params are on CUDA (default fp32).
    """
    groups = groups if groups is not None else plan_like.groups
    unknown = set(param_groups) - set(groups)
    if unknown:
        raise ValueError(f"unknown optimizer param groups {sorted(unknown)}; the model family defines "
                         f"{sorted(groups)}")
    seen: set[int] = set()
    for name, params in param_groups.items():
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter appears in more than one optimizer group (again in {name!r})")
            seen.add(id(p))
    lr_scheduler_cfg = lr_scheduler_cfg or LRSchedulerConfig()
    compute_dtype = compute_dtype or torch.float32

    adam_groups = [dict(params=list(param_groups[name]), name=name, eps=ADAM_EPS, lr=g.lr, betas=g.betas,
                        weight_decay=g.weight_decay)
                   for name, g in groups.items() if g.optimizer == ADAMW and param_groups.get(name)]
    adamw = AdamW(adam_groups, eps=ADAM_EPS) if adam_groups else None

    muon_names = [name for name, g in groups.items() if g.optimizer == MUON and param_groups.get(name)]
    if muon_names not in ([], [MUON_GROUP]):  # Muon names its shape groups and state "matrices_RxC"
        raise ValueError(f"the Muon group must be the one named {MUON_GROUP!r}; the model family defines {muon_names}")
    muon = None
    if muon_names:
        settings, matrices = groups[muon_names[0]], list(param_groups[muon_names[0]])
        if matrices[0].device.type != "cuda" and not (matrices[0].device.type == "cpu" and cpu_has_native_bf16()):
            # Orthogonalise in the compute dtype, as the reference does, where bf16 is native. A CPU without
            # avx512_bf16/AMX emulates bf16 batched matmuls 15-50x slower than fp32 (torch 2.13, AVX2 machines);
            # with avx512_bf16 they run 2.2x faster than fp32 (Polar Express on (16, 256, 256): 21.8 vs 50.4 ms).
            compute_dtype = torch.float32
        muon = Muon(matrices, lr=settings.lr, momentum=lr_scheduler_cfg.momentum_start,
                    weight_decay=settings.weight_decay, beta2=optimizer_cfg.muon_beta2,
                    ns_steps=optimizer_cfg.muon_ns_steps, compute_dtype=compute_dtype)
    schedule = TrainingSchedule(lr_scheduler_cfg, plan_like.num_iterations)
    return OptimizersContainer(adamw, muon, schedule)
