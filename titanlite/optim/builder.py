"""build_optimizers: the recipe's six AdamW groups + Muon shape groups, LRs scaled per recipe §2.6 / §3.1.

| group          | LR                                          | betas                    | wd    |
| lm_head        | unembedding_lr * batch_scale * width_scale  | (adam_beta1, unembedding_beta2) | 0.01 |
| wte            | embedding_lr * batch_scale * width_scale    | (adam_beta1, embedding_beta2) | 0.001 |
| value_embeds   | embedding_lr * batch_scale * width_scale / 2| (adam_beta1, embedding_beta2) | 0.01  |
(unembedding_beta2 / embedding_beta2 = -1 fall back to adam_beta2.)
| resid_lambdas  | scalar_lr * batch_scale * 0.01              | (0.8, 0.95)              | 0.05  |
| x0_lambdas     | scalar_lr * batch_scale                     | (0.96, 0.95)             | 0.0   |
| smear          | 0.2 (fixed: no batch or width scaling)      | (0.8, 0.95)              | 0.0   |
| matrices: Muon | matrix_lr * batch_scale (x sqrt(max(1, rows/cols)) per shape), wd = plan.weight_decay_scaled |

The seed's adam_beta1/adam_beta2 set the embedding-type groups' betas (recipe §12 mapping rule); the other
groups keep the recipe's betas.
"""

from __future__ import annotations

import torch

from titanlite.optim.adamw import AdamW
from titanlite.optim.container import OptimizersContainer
from titanlite.optim.muon import Muon
from titanlite.optim.schedules import TrainingSchedule

ADAMW_GROUPS = ("lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "smear")
MUON_GROUP = "matrices"
ADAM_EPS = 1e-10
SMEAR_LR = 0.2


def adamw_group_settings(optimizer_cfg, plan_like) -> dict[str, dict]:
    """LR, betas and weight decay of each AdamW group."""
    cfg, bls, dms = optimizer_cfg, plan_like.batch_lr_scale, plan_like.width_lr_scale
    # The seed's adam_beta2 sets all three embedding-type groups; the optional per-group keys reproduce the
    # later recipe (lm_head 0.96, wte/VE 0.995) in the shipped configs.
    unembedding_beta2 = cfg.adam_beta2 if cfg.unembedding_beta2 < 0 else cfg.unembedding_beta2
    embedding_beta2 = cfg.adam_beta2 if cfg.embedding_beta2 < 0 else cfg.embedding_beta2
    embedding_betas = (cfg.adam_beta1, embedding_beta2)
    return {
        "lm_head": dict(lr=cfg.unembedding_lr * bls * dms, betas=(cfg.adam_beta1, unembedding_beta2),
                        weight_decay=0.01),
        "wte": dict(lr=cfg.embedding_lr * bls * dms, betas=embedding_betas, weight_decay=0.001),
        "value_embeds": dict(lr=cfg.embedding_lr * bls * dms * 0.5, betas=embedding_betas, weight_decay=0.01),
        "resid_lambdas": dict(lr=cfg.scalar_lr * bls * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
        "x0_lambdas": dict(lr=cfg.scalar_lr * bls, betas=(0.96, 0.95), weight_decay=0.0),
        "smear": dict(lr=SMEAR_LR, betas=(0.8, 0.95), weight_decay=0.0),
    }


def muon_lr(optimizer_cfg, plan_like) -> float:
    """Muon's base LR; each shape group then runs at this x sqrt(max(1, rows/cols))."""
    return optimizer_cfg.matrix_lr * plan_like.batch_lr_scale


def group_learning_rates(optimizer_cfg, plan_like) -> dict[str, float]:
    """The initial LR of every group, as the optimizers are built with it (the plan prints these)."""
    lrs = {name: settings["lr"] for name, settings in adamw_group_settings(optimizer_cfg, plan_like).items()}
    lrs[MUON_GROUP] = muon_lr(optimizer_cfg, plan_like)
    return lrs


def build_optimizers(param_groups: dict[str, list[torch.nn.Parameter]], optimizer_cfg, plan_like,
                     lr_scheduler_cfg=None, *, compute_dtype: torch.dtype | None = None) -> OptimizersContainer:
    """AdamW + Muon + schedule for a model's `optimizer_param_groups()`.

    plan_like: anything with batch_lr_scale, width_lr_scale, weight_decay_scaled, num_iterations (scaling.Plan).
    lr_scheduler_cfg: the `lr_scheduler` section (defaults when None). compute_dtype: the model's compute
    dtype; Muon orthogonalises in bf16 when it is bf16 and the params are on CUDA (default:
    plan_like.compute_dtype if present, else fp32).
    """
    unknown = set(param_groups) - set(ADAMW_GROUPS) - {MUON_GROUP}
    if unknown:
        raise ValueError(f"unknown optimizer param groups {sorted(unknown)}; "
                         f"expected {list(ADAMW_GROUPS) + [MUON_GROUP]}")
    seen: set[int] = set()
    for name, params in param_groups.items():
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter appears in more than one optimizer group (again in {name!r})")
            seen.add(id(p))
    if lr_scheduler_cfg is None:
        from titanlite.config.sections import LRSchedulerConfig
        lr_scheduler_cfg = LRSchedulerConfig()
    if compute_dtype is None:
        compute_dtype = getattr(plan_like, "compute_dtype", None) or torch.float32

    settings = adamw_group_settings(optimizer_cfg, plan_like)
    adam_groups = [dict(params=list(param_groups[name]), name=name, eps=ADAM_EPS, **settings[name])
                   for name in ADAMW_GROUPS if param_groups.get(name)]
    adamw = AdamW(adam_groups, eps=ADAM_EPS) if adam_groups else None

    matrices = list(param_groups.get(MUON_GROUP, []))
    muon = None
    if matrices:
        if matrices[0].device.type != "cuda":
            # bf16 *batched* matmuls (bmm/baddbmm) run 15-50x slower than fp32 on CPU (measured, torch 2.13,
            # on this project's CPU machines), unlike 2-D ones; the reference orthogonalises in bf16 on CUDA only too.
            compute_dtype = torch.float32
        muon = Muon(matrices, lr=muon_lr(optimizer_cfg, plan_like),
                    momentum=lr_scheduler_cfg.momentum_start, weight_decay=plan_like.weight_decay_scaled,
                    beta2=optimizer_cfg.muon_beta2, ns_steps=optimizer_cfg.muon_ns_steps,
                    compute_dtype=compute_dtype)
    schedule = TrainingSchedule(lr_scheduler_cfg, plan_like.num_iterations)
    return OptimizersContainer(adamw, muon, schedule)
