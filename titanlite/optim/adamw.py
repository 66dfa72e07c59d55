"""AdamW for the embedding, unembedding and scalar groups (docs/recipe.md §3.2).

Elementwise, so under FSDP2 it runs on each rank's local shard of the DTensor parameters with no
communication. Master weights and both moments are fp32 whatever the parameter dtype (a bf16 parameter is
updated in fp32 and written back). The math and its order follow torch.optim.AdamW exactly:

    p <- p * (1 - lr * wd)                                   decoupled decay, before the update
    m <- lerp(m, g, 1 - beta1);  v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)     t = per-parameter step, from 1
"""

from __future__ import annotations

import math

import torch

from titanlite.optim.sharded_matrices import local_tensor
from titanlite.optim.state_io import copy_state_into


class AdamW(torch.optim.Optimizer):
    """AdamW over named param groups; Stateful with DCP-reshardable state (see state_dict)."""

    def __init__(self, param_groups: list[dict], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-10, weight_decay: float = 0.0):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for index, group in enumerate(self.param_groups):
            group.setdefault("name", f"group{index}")
            group.setdefault("initial_lr", group["lr"])
            for p in group["params"]:
                # Created up front (not lazily) so a DCP load before the first step has tensors to fill.
                self.state[p] = {
                    "step": 0,
                    "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
                }

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("titanlite AdamW does not take a closure")
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                step = state["step"]
                param = local_tensor(p)
                master = param if param.dtype == torch.float32 else param.float()
                grad = local_tensor(p.grad).float()
                exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])
                if wd != 0.0:
                    master.mul_(1.0 - lr * wd)
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1 ** step
                bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                if master is not param:
                    param.copy_(master)

    def state_dict(self) -> dict:
        """{"<group>.<i>": {"step": 0-D tensor, "exp_avg": ..., "exp_avg_sq": ...}}; moments shaped like params."""
        out = {}
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                state = self.state[p]
                out[f"{group['name']}.{index}"] = {
                    "step": torch.tensor(float(state["step"])),
                    "exp_avg": state["exp_avg"],
                    "exp_avg_sq": state["exp_avg_sq"],
                }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                key = f"{group['name']}.{index}"
                if key not in state_dict:
                    raise KeyError(f"AdamW state for {key} is missing from the checkpoint")
                saved, state = state_dict[key], self.state[p]
                state["step"] = int(saved["step"])
                copy_state_into(state["exp_avg"], saved["exp_avg"], f"{key}.exp_avg")
                copy_state_into(state["exp_avg_sq"], saved["exp_avg_sq"], f"{key}.exp_avg_sq")
