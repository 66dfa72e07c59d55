"""Muon for every matrix in the transformer blocks (docs/recipe.md §3.3), distributed over FSDP2 shards.

One param group per distinct shape (sorted by shape). Per step and group:
1. Nesterov momentum on the local row shards (elementwise, so it needs no communication):
   buf <- mu*buf + (1-mu)*g,  u = (1-mu)*g + mu*buf; u cast to the compute dtype (bf16 halves the traffic too).
2. all_to_all: the owner of each matrix receives its whole u. Every matrix has one owner in the whole mesh,
   replicas included, chosen for all shape groups together so the Polar Express work is balanced
   (sharded_matrices.assign_owners).
3. The owner computes the direction (MuonEq, normalise, Polar Express, Muon+ rescale, NorMuon) for its
   matrices only (`orthogonalized_matrices` counts them).
4. all_to_all back: every rank (of every replica) receives its rows of every update.
5. Cautious weight decay + update on the local shard (elementwise again):
   mask = (update * p >= 0);  p <- p - lr_eff*update - lr_eff*wd*p*mask,  lr_eff = lr*sqrt(max(1, rows/cols)).
Exchanges are asynchronous and all groups are in flight together, so communication overlaps the math.
Without a process group (plain tensors) the same code runs with the exchanges skipped.

State: the momentum buffer is shaped and sharded like its parameter (fp32); NorMuon's small second-moment
vector lives only on the owner and is gathered into a full tensor in state_dict, so a checkpoint loads under
any world size.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from titanlite.optim.muon_math import muon_direction, second_moment_shape
from titanlite.optim.sharded_matrices import (GroupLayout, assign_owners, describe_group, gather_owned, local_tensor,
                                              scatter_updates)
from titanlite.optim.state_io import copy_state_into


def group_by_shape(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """One list per distinct 2-D shape, shapes in sorted order, params in their given order within a shape."""
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.ndim != 2:
            raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
        by_shape[tuple(p.shape)].append(p)
    return [by_shape[shape] for shape in sorted(by_shape)]


class Muon(torch.optim.Optimizer):
    """Muon with NorMuon and cautious weight decay; whole-matrix work split across the FSDP shard ranks."""

    def __init__(self, params: list[torch.Tensor], lr: float = 0.02, momentum: float = 0.95,
                 weight_decay: float = 0.0, beta2: float = 0.9, ns_steps: int = 5,
                 compute_dtype: torch.dtype = torch.float32):
        if ns_steps < 1:
            raise ValueError(f"Muon needs at least one Polar Express step; got ns_steps={ns_steps}")
        groups = []
        for shape_params in group_by_shape(list(params)):
            rows, cols = shape_params[0].shape
            groups.append(dict(params=shape_params, name=f"matrices_{rows}x{cols}", initial_lr=lr,
                               initial_weight_decay=weight_decay))
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2,
                                      ns_steps=ns_steps))
        self.compute_dtype = compute_dtype
        self._layouts: list[GroupLayout] = [describe_group(g["params"]) for g in self.param_groups]
        assign_owners(self._layouts)
        self._second_moments: list[torch.Tensor] = []
        for group, layout in zip(self.param_groups, self._layouts):
            for p in group["params"]:
                self.state[p] = {"momentum_buffer": torch.zeros_like(p, dtype=torch.float32)}
            device = local_tensor(group["params"][0]).device
            shape = (len(layout.owned), *second_moment_shape(layout.rows, layout.cols))
            self._second_moments.append(torch.zeros(shape, dtype=torch.float32, device=device))
        # Matrices this rank has orthogonalised since construction (tests assert the split across ranks).
        self.orthogonalized_matrices = 0

    @property
    def layouts(self) -> list[GroupLayout]:
        return self._layouts

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("titanlite Muon does not take a closure")
        active = [i for i, g in enumerate(self.param_groups) if any(p.grad is not None for p in g["params"])]
        gathers = [(i, gather_owned(self._layouts[i], self._nesterov(self.param_groups[i]))) for i in active]
        scatters = []
        for i, pending in gathers:
            group, layout = self.param_groups[i], self._layouts[i]
            owned_u = pending.result()
            if owned_u.shape[0] > 0:
                updates = muon_direction(owned_u, self._second_moments[i], group["beta2"], group["ns_steps"])
                self.orthogonalized_matrices += owned_u.shape[0]
            else:
                updates = owned_u.new_empty((0, layout.rows, layout.cols), dtype=torch.float32)
            scatters.append((i, scatter_updates(layout, updates)))
        for i, pending in scatters:
            self._apply_updates(self.param_groups[i], self._layouts[i], pending.result())

    def _nesterov(self, group: dict) -> list[torch.Tensor]:
        """Update the momentum buffers of the local shards and return the Nesterov directions u."""
        mu = group["momentum"]
        directions = []
        for p in group["params"]:
            buf = local_tensor(self.state[p]["momentum_buffer"])
            grad = local_tensor(p.grad).float() if p.grad is not None else torch.zeros_like(buf)
            buf.lerp_(grad, 1.0 - mu)
            directions.append(grad.lerp(buf, mu).to(self.compute_dtype))
        return directions

    def _apply_updates(self, group: dict, layout: GroupLayout, local_updates) -> None:
        lr_eff = group["lr"] * math.sqrt(max(1.0, layout.rows / layout.cols))
        wd = group["weight_decay"]
        for p, update in zip(group["params"], local_updates):
            param = local_tensor(p)
            master = param if param.dtype == torch.float32 else param.float()
            if wd != 0.0:
                # Cautious decay: only shrink weights the update is already pushing toward zero.
                decay = master * (update * master >= 0)
                master.add_(update, alpha=-lr_eff).add_(decay, alpha=-lr_eff * wd)
            else:
                master.add_(update, alpha=-lr_eff)
            if master is not param:
                param.copy_(master)

    # ---- Stateful -------------------------------------------------------------------------------------------
    def _full_second_moments(self, index: int) -> torch.Tensor:
        """(K, r, c) NorMuon buffers of the whole group: owners fill their chunk, a sum assembles the rest."""
        layout, owned = self._layouts[index], self._second_moments[index]
        full = owned.new_zeros((layout.num_matrices, *owned.shape[1:]))
        if layout.owned:
            full[torch.tensor(layout.owned, device=full.device)] = owned
        if layout.distributed:
            dist.all_reduce(full, group=layout.exchange_group)
        return full

    def state_dict(self) -> dict:
        """{"matrices_RxC.<i>": {"momentum_buffer": like param, "second_momentum_buffer": full (r, c)}}.

        Collective when distributed (every shard rank must call it).
        """
        out = {}
        for index, group in enumerate(self.param_groups):
            second = self._full_second_moments(index)
            for i, p in enumerate(group["params"]):
                out[f"{group['name']}.{i}"] = {"momentum_buffer": self.state[p]["momentum_buffer"],
                                               "second_momentum_buffer": second[i].clone()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        for index, group in enumerate(self.param_groups):
            owned = self._layouts[index].owned
            for i, p in enumerate(group["params"]):
                key = f"{group['name']}.{i}"
                if key not in state_dict:
                    raise KeyError(f"Muon state for {key} is missing from the checkpoint")
                saved = state_dict[key]
                copy_state_into(self.state[p]["momentum_buffer"], saved["momentum_buffer"], f"{key}.momentum_buffer")
                if i in owned:
                    copy_state_into(self._second_moments[index][owned.index(i)], saved["second_momentum_buffer"],
                                    f"{key}.second_momentum_buffer")
