"""The attention kernel, decided once for all ranks.

Probing on every rank (the kernel hub has a 10 s deadline) lets ranks disagree at scale: one whose probe times out
falls through to another kernel, so ranks train with different numerics and the slowest gates every step. Here
rank 0 walks the chain (titanlite.attention.select_attention_backend), broadcasts what it chose, and every other
rank loads exactly that entry, with no probe and no fallthrough. If any rank cannot, every rank stops with one
line naming it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from titanlite.attention import chosen_label, load_chosen, select_attention_backend
from titanlite.errors import UserError


def agree_attention_backend(requested: str, device_type: str, dtype: torch.dtype, window_pattern: str,
                            distributed: bool = True) -> tuple[str, list[str]]:
    """(backend, start-up lines) as select_attention_backend returns them, the same on every rank.

    Collective when `distributed` and a process group of several ranks exists: every rank must call it. A
    one-process assembly inside a distributed job (distributed=False) decides alone, and so does rank 0 of a fake
    process group (plan --simulate): its collectives move no data, and object collectives cannot run under fake
    tensors.
    """
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not (distributed and several) or dist.get_backend() == "fake":
        return select_attention_backend(requested, device_type, dtype, window_pattern)
    decision: list[dict | None] = [None]
    if dist.get_rank() == 0:
        try:
            backend, lines = select_attention_backend(requested, device_type, dtype, window_pattern)
            decision = [{"backend": backend, "label": chosen_label(backend), "lines": lines}]
        except UserError as error:
            decision = [{"error": str(error)}]
    dist.broadcast_object_list(decision, src=0)
    chosen = decision[0]
    if "error" in chosen:
        raise UserError(chosen["error"])
    why = "" if dist.get_rank() == 0 else load_chosen(chosen["label"], device_type, dtype)
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, why)
    failed = [(rank, reason) for rank, reason in enumerate(reasons) if reason]
    if failed:
        rank, reason = failed[0]
        others = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise UserError(f"rank {rank}{others} cannot load the attention kernel rank 0 chose, {chosen['label']}: "
                        f"{reason}; install it on every node, or set model.attention_backend to a kernel every "
                        "node has (sdpa runs everywhere)")
    return chosen["backend"], chosen["lines"]
