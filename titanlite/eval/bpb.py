"""Validation bits per byte (docs/recipe.md §7.1): a vocab-independent loss.

bpb = Σ nats over targets with bytes > 0 / (ln 2 · Σ bytes); special tokens (0 bytes) and ignored targets are
excluded; sums are all-reduced across ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def bpb_sums(per_token_nats: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ nats, Σ bytes) for one batch, in float64 so long evaluations do not lose precision."""
    safe = targets.clamp(min=0)
    nbytes = torch.where(targets >= 0, token_bytes[safe], torch.zeros_like(safe)).to(torch.float64)
    counted = nbytes > 0
    nats = torch.where(counted, per_token_nats.to(torch.float64), torch.zeros_like(nbytes))
    return nats.sum(), nbytes.sum()


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Run `steps` batches of (inputs, targets) through `model(x, y, loss_reduction='none')`."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        inputs, targets = next(batches)
        losses = model(inputs, targets, loss_reduction="none")
        nats, nbytes = bpb_sums(losses, targets, token_bytes)
        total_nats += nats
        total_bytes += nbytes
    if dist.is_available() and dist.is_initialized():
        sums = torch.stack([total_nats, total_bytes])
        dist.all_reduce(sums)
        total_nats, total_bytes = sums[0], sums[1]
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
