"""Loading optimizer state saved under a different world size (or none).

Optimizer state dicts here are keyed by "<group name>.<index in group>" rather than torch's integer param ids,
and their tensors are DTensors shaped like the parameters (or plain tensors without a process group). DCP
reshards such a dict on load; `copy_state_into` covers the rest (a dict from torch.load, a plain tensor going
into a DTensor).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def copy_state_into(dst: torch.Tensor, src: torch.Tensor, where: str) -> None:
    """Copy `src` into the existing state tensor `dst` in place, resharding a full tensor if needed."""
    if src is dst:  # DCP loaded in place already
        return
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"optimizer state {where}: checkpoint shape {tuple(src.shape)} != {tuple(dst.shape)}")
    if isinstance(dst, DTensor) and not isinstance(src, DTensor):
        # Every rank holds the full tensor, so each can cut its own shard without communication.
        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
    elif isinstance(src, DTensor) and not isinstance(dst, DTensor):
        src = src.full_tensor()
    if isinstance(dst, DTensor) and tuple(src.placements) != tuple(dst.placements):
        src = src.redistribute(dst.device_mesh, dst.placements)
    dst.copy_(src)
