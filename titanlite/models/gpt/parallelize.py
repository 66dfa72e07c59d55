"""Make the meta-device GPT trainable at scale: float8 -> activation checkpointing -> compile -> FSDP2.

The order is torchtitan's (torchtitan_lessons.md §1.8) and each step depends on the previous one:
float8 swaps Linear classes, so it must run before anything captures the modules; activation checkpointing
wraps each block's forward, so compile traces the recompute policy together with the block; FSDP shards the
compiled blocks last, so its all-gather/reduce-scatter hooks stay outside the compiled graphs. The caller then
runs `materialize(model, device)` (to_empty + init_weights + init_buffers) and builds the optimizers on the
sharded parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from titanlite.distributed import WorldInfo
from titanlite.errors import UserError
from titanlite.float8 import apply_float8
from titanlite.logging_utils import logger
from titanlite.models.gpt.model import GPT


# ----- activation checkpointing ------------------------------------------------------------------------------

def _checkpoint_block(block: nn.Module) -> None:
    """Recompute `block`'s activations in backward instead of keeping them.

    An instance-level forward override rather than a wrapper module: parameter names (and so checkpoints and
    exports) are the same with and without activation checkpointing.
    """
    inner_forward = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner_forward, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def apply_ac(model: nn.Module, ac_cfg) -> list[int]:
    """none | selective (every `selective_every`-th block) | full (every block); returns the wrapped indices."""
    mode = ac_cfg.mode
    if mode == "none":
        return []
    if mode == "full":
        chosen = list(range(len(model.blocks)))
    elif mode == "selective":
        every = ac_cfg.selective_every
        if every < 1:
            raise UserError(f"activation_checkpoint.selective_every = {every} must be >= 1 (1 = every block)")
        chosen = [i for i in range(len(model.blocks)) if i % every == 0]
    else:
        raise UserError(f"activation_checkpoint.mode = {mode!r} is not supported; use none, selective or full")
    for i in chosen:
        _checkpoint_block(model.blocks[i])
    logger.info(f"Activation checkpointing ({mode}): {len(chosen)} of {len(model.blocks)} blocks")
    return chosen


# ----- torch.compile -----------------------------------------------------------------------------------------

def compile_enabled(compile_cfg, device_type: str) -> bool:
    """compile.enabled: auto = on for CUDA only (on CPU it costs ~20 s per process and gains little)."""
    value = str(compile_cfg.enabled).strip().lower()
    if value == "auto":
        return device_type == "cuda"
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise UserError(f"compile.enabled = {compile_cfg.enabled!r} is not supported; use auto, true or false")


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately (identical blocks share one compiled graph), re-registered in place.

    The `_orig_mod.` prefix compile adds to parameter names is stripped by DCP's get_model_state_dict.
    dynamic=False: training shapes never change, and static shapes give the fastest kernels.
    """
    for name, block in list(model.blocks.named_children()):
        model.blocks.register_module(name, torch.compile(block, dynamic=False))
    logger.info(f"torch.compile: {len(model.blocks)} blocks")


# ----- FSDP2 -------------------------------------------------------------------------------------------------

def apply_fsdp(model: nn.Module, world: WorldInfo, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """fully_shard the embeddings, each block, the head, then the root (HSDP when the mesh is 2-D).

    Gradients are summed, never averaged, across ranks: the trainer divides the summed token losses by the
    global token count, so the result is exact for any split of the batch over ranks and micro-steps
    (torchtitan PR #2206). Forcing SUM also avoids PREMUL_SUM, which gloo does not have.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    mesh = world.mesh
    fully_shard(model.wte, mesh=mesh, mp_policy=mp_policy)
    for table in model.value_embeds.values():
        fully_shard(table, mesh=mesh, mp_policy=mp_policy)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    # The head's output feeds the loss and then its backward straight away: resharding it would only make
    # FSDP gather it again immediately.
    fully_shard(model.lm_head, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    logger.info(f"FSDP2: {'HSDP ' if mesh.ndim == 2 else ''}mesh {tuple(mesh.shape)}, "
                f"params {param_dtype}, reduce {reduce_dtype}")


# ----- the whole pipeline ------------------------------------------------------------------------------------

def parallelize_gpt(model: nn.Module, world: WorldInfo, compile_cfg, float8_cfg, ac_cfg,
                    param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    """float8 -> activation checkpointing -> compile -> FSDP2 (when there is a mesh), all in place."""
    apply_float8(model, float8_cfg, world.device)
    apply_ac(model, ac_cfg)
    if compile_enabled(compile_cfg, world.device.type):
        apply_compile(model)
    if world.mesh is not None:
        apply_fsdp(model, world, param_dtype, reduce_dtype)
    return model


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate the (possibly sharded) meta parameters on `device` and run the real initialisation.

    Weights are always drawn on the CPU generator from full-size tensors, so every layout (1 process, N
    FSDP ranks, HSDP, CPU or GPU) starts from bit-identical weights for the same seed. A sharded model cannot
    draw its own shards that way: DTensor random ops on a CPU mesh just draw each local shard from the local
    generator, and on GPU they follow a different (offset-based) stream than a plain tensor. So a full CPU
    replica is initialised and each rank keeps its slice of every tensor.
    """
    device = torch.device(device)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if not sharded:
        model.to_empty(device="cpu")
        model.init_weights()
        model.to(device)
        model.init_buffers()  # non-persistent RoPE tables, recomputed on the training device
        return model

    model.to_empty(device=device)
    with torch.device("meta"):  # building on meta draws no random numbers (nn.Linear's own init would)
        replica = GPT(model.args)  # the plain model: same parameter names and init code
    replica.to_empty(device="cpu")
    replica.init_weights()
    full_params = dict(replica.named_parameters())
    for name, param in model.named_parameters():
        full = full_params[name.replace("_orig_mod.", "")].to(device)
        if isinstance(param, DTensor):
            # Every rank holds the same full tensor, so each cuts out its own shard without communication.
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)
    model.init_buffers()
    return model
