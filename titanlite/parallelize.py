"""Make a meta-device model trainable at scale: float8 -> activation checkpointing -> compile -> FSDP2.

Model-family agnostic: it needs the model's `blocks` (nn.ModuleList) and, from the family's spec, which other
modules are FSDP units of their own.

The order is torchtitan's and each step depends on the previous one:
float8 swaps Linear classes, so it must run before anything captures the modules; activation checkpointing
wraps each block's forward, so compile traces the recompute policy together with the block; FSDP shards the
compiled blocks last, so its all-gather/reduce-scatter hooks stay outside the compiled graphs. The caller then
runs `materialize(model, device)` (to_empty, then init_weights drawing per-parameter-name seeded values on the
device) and builds the optimizers on the sharded parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from titanlite.distributed import WorldInfo
from titanlite.errors import UserError
from titanlite.float8 import apply_float8
from titanlite.logging_utils import logger


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
    """compile.enabled as a bool where no run length is known: auto = on for CUDA only (on CPU see
    resolve_compile, which the trainer uses)."""
    value = str(compile_cfg.enabled).strip().lower()
    if value == "auto":
        return device_type == "cuda"
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise UserError(f"compile.enabled = {compile_cfg.enabled!r} is not supported; use auto, true or false")


def resolve_scope(scope: str, device_type: str, sharded: bool) -> str:
    """compile.scope: auto = the whole model on one CPU process (per-block compile gained nothing on CPU),
    each block elsewhere (GPUs, and FSDP, whose hooks must stay outside the graphs)."""
    if scope == "auto":
        return "model" if device_type == "cpu" and not sharded else "blocks"
    if scope not in ("blocks", "model"):
        raise UserError(f"compile.scope = {scope!r} is not supported; use auto, blocks or model")
    return scope


# CPU with compile.enabled = auto. The whole-model compile measured +13-18% tok/s in bf16 (bench_cpu_d4: d4, T=512,
# 8k tokens/step, AVX-512 bf16, 2 threads: 6,764 vs 5,956 tok/s) but +6% (AVX-512) to -1% (AVX2) in fp32, and it
# costs 20 s (warm inductor cache) to 75 s (cold) at d4, more with depth. So auto compiles a one-process bf16 run
# that would train eagerly for at least this long, estimated from the plan's FLOPs at CPU_EAGER_MFU of the peak.
CPU_AUTO_COMPILE_MIN_SECONDS = 30 * 60
CPU_EAGER_MFU = 0.5  # bf16 eager on bench_cpu_d4 measured 47-55% of the bf16 matmul peak


def resolve_compile(compile_cfg, device_type: str, *, processes: int, compute_dtype: torch.dtype,
                    train_flops: float, peak_flops: float | None):
    """(compile section with enabled and scope settled to true/false and blocks/model, start-up line or None).

    auto on CUDA: on, per block. auto on CPU: the whole model for a one-process bf16 run expected to train for
    at least CPU_AUTO_COMPILE_MIN_SECONDS eagerly; off otherwise. The line says what auto chose and why.
    """
    sharded = processes > 1
    enabled, line = compile_enabled(compile_cfg, device_type), None
    if str(compile_cfg.enabled).strip().lower() == "auto" and device_type == "cpu":
        minutes = train_flops / (peak_flops * CPU_EAGER_MFU * processes) / 60 if peak_flops else 0.0
        threshold = CPU_AUTO_COMPILE_MIN_SECONDS / 60
        enabled = compute_dtype == torch.bfloat16 and not sharded and minutes >= threshold
        if enabled:
            line = (f"torch.compile: the whole model (compile.enabled = auto: a one-process bf16 CPU run of about "
                    f"{minutes:.0f} min eagerly, where compiling measured 13-18% faster after a 20-75 s compile)")
        else:
            why = ("bf16 only: fp32 gained 6% at best" if compute_dtype != torch.bfloat16 else
                   "one process only" if sharded else f"runs of {threshold:.0f}+ min only; this one is about "
                   f"{minutes:.1f} min eagerly")
            line = f"torch.compile: off (compile.enabled = auto on CPU compiles {why}; --compile.enabled=true forces it)"
    scope = resolve_scope(compile_cfg.scope, device_type, sharded)
    return dataclasses.replace(compile_cfg, enabled="true" if enabled else "false", scope=scope), line


def apply_compile(model: nn.Module, scope: str = "blocks", sharded: bool = False) -> None:
    """scope "blocks": compile each block separately (identical blocks share one compiled graph), re-registered
    in place; the `_orig_mod.` prefix compile adds to parameter names is stripped by DCP's get_model_state_dict.
    scope "model": compile the whole forward in place (`nn.Module.compile`: names unchanged), so the embeddings,
    the norms and scalars between blocks and the head's elementwise work fuse too. Not under FSDP, whose
    per-block all-gather hooks would then be traced into the graph.
    dynamic=False: training shapes never change, and static shapes give the fastest kernels.
    """
    if scope == "model":
        if sharded:
            raise UserError("compile.scope = model traces FSDP's per-block hooks into one graph, so it runs in a "
                            "single process only; use compile.scope = blocks with more than one process")
        model.compile(dynamic=False)
        logger.info("torch.compile: the whole model")
        return
    if scope != "blocks":
        raise UserError(f"compile.scope = {scope!r} is not supported; use blocks or model")
    for name, block in list(model.blocks.named_children()):
        model.blocks.register_module(name, torch.compile(block, dynamic=False))
    logger.info(f"torch.compile: {len(model.blocks)} blocks")


# ----- FSDP2 -------------------------------------------------------------------------------------------------

def apply_fsdp(model: nn.Module, world: WorldInfo, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype = torch.float32, units: tuple[nn.Module, ...] = (),
               gathered_units: tuple[nn.Module, ...] = (), embedding_units: tuple[nn.Module, ...] = ()) -> None:
    """fully_shard `units`, `embedding_units`, each block, `gathered_units`, then the root (HSDP on a 2-D mesh).

    `gathered_units` stay unsharded from forward to backward: a head whose output feeds the loss and then its
    backward straight away would otherwise be gathered again immediately.
    `embedding_units` (lookup tables) are not gathered again for backward: an embedding's backward reads only
    the indices and the output gradient, never the weight (at d26 that saves ~1.4 GB of bf16 all-gather per
    micro-step for the GPT's token and value embeddings, without holding them gathered).
    Gradients are summed, never averaged, across ranks: the trainer divides the summed token losses by the
    global token count, so the result is exact for any split of the batch over ranks and micro-steps
    (torchtitan PR #2206). Forcing SUM also avoids PREMUL_SUM, which gloo does not have.
    """
    modules = {id(m) for m in model.modules()}
    for unit in (*units, *embedding_units, *gathered_units):
        if id(unit) not in modules:  # e.g. a head taken before float8 replaced it: FSDP would shard a dead module
            raise ValueError(f"FSDP unit {type(unit).__name__} is not part of the model; choose units after "
                             "module swaps (pass a function of the model)")
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # a block that casts its own inputs (`casts_own_inputs`, e.g. the GPT's, whose fp32 RoPE tables FSDP's cast of
    # every floating-point argument would round to bf16) is told the dtype instead
    own_cast_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                           cast_forward_inputs=False)
    mesh = world.mesh
    for unit in (*units, *embedding_units):
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy)
    for unit in embedding_units:
        unit.set_unshard_in_backward(False)
    for block in model.blocks:
        casts_own_inputs = getattr(block, "casts_own_inputs", False)
        fully_shard(block, mesh=mesh, mp_policy=own_cast_policy if casts_own_inputs else mp_policy)
        if casts_own_inputs:
            block.input_dtype = param_dtype
    for unit in gathered_units:
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    logger.info(f"FSDP2: {'HSDP ' if mesh.ndim == 2 else ''}mesh {tuple(mesh.shape)}, "
                f"params {param_dtype}, reduce {reduce_dtype}")


def set_replica_all_reduce(model: nn.Module, enabled: bool) -> None:
    """HSDP: whether the backward about to run all-reduces gradients across the replicas. With gradient
    accumulation only the last micro-step needs to: the reduce-scattered shards accumulate locally until then,
    so the cross-node all-reduce runs once per step instead of once per micro-step. No-op without FSDP."""
    if isinstance(model, FSDPModule):
        model.set_requires_all_reduce(enabled)


# ----- the whole pipeline ------------------------------------------------------------------------------------

UnitsOf = Callable[[nn.Module], tuple[nn.Module, ...]]


def _no_units(model: nn.Module) -> tuple[nn.Module, ...]:
    return ()


def parallelize(model: nn.Module, world: WorldInfo, compile_cfg, float8_cfg, ac_cfg,
                param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32,
                fsdp_units: UnitsOf = _no_units, fsdp_gathered_units: UnitsOf = _no_units,
                fsdp_embedding_units: UnitsOf = _no_units) -> nn.Module:
    """float8 -> activation checkpointing -> compile -> FSDP2 (when there is a mesh), all in place.

    The FSDP units are functions of the model, called after the float8 swap: a module taken before it (the head,
    which float8 replaces) would be a detached object, and its live replacement would fall into the root unit.
    """
    apply_float8(model, float8_cfg, world.device)
    apply_ac(model, ac_cfg)
    if compile_enabled(compile_cfg, world.device.type):
        sharded = world.mesh is not None
        apply_compile(model, resolve_scope(compile_cfg.scope, world.device.type, sharded), sharded=sharded)
    if world.mesh is not None:
        apply_fsdp(model, world, param_dtype, reduce_dtype, fsdp_units(model), fsdp_gathered_units(model),
                   fsdp_embedding_units(model))
    return model


# ----- initialisation on the training device ----------------------------------------------------------------

# Random fills run in chunks of this many elements of the flattened full tensor, each chunk from its own
# generator seeded by (run seed, parameter name, chunk index): any shard of any layout draws exactly the values of
# its slice of the full tensor. Chunks inside the shard are drawn in place; only the (at most two) chunks a shard
# boundary cuts go through a temporary, so init needs the shard plus 4 MiB, never a full copy.
INIT_CHUNK_ELEMENTS = 1 << 20


def _seed_for(base_seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{base_seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _local_region(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part of `param` as a plain tensor, its first element's index in the flattened full tensor)."""
    if not isinstance(param, DTensor):
        return param, 0
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape[1:]) != tuple(param.shape[1:]):
        raise NotImplementedError(f"per-name init needs shards along dim 0 (FSDP's); got {param.placements}")
    local = param.to_local()
    # the row size from the shape: indexing the DTensor (param[0]) would all-gather it
    return local, offset[0] * math.prod(param.shape[1:])


def _fill_random(param: torch.Tensor, name: str, base_seed: int, draw) -> None:
    """Fill this rank's part of `param` with draw(buffer, generator) applied chunk by chunk to the full tensor."""
    local, start = _local_region(param)
    count = local.numel()
    if count == 0:
        return
    flat = local.view(-1)
    total = param.numel()
    chunk = INIT_CHUNK_ELEMENTS
    for index in range(start // chunk, (start + count - 1) // chunk + 1):
        first = index * chunk
        size = min(chunk, total - first)
        generator = torch.Generator(device=local.device).manual_seed(_seed_for(base_seed, name, index))
        lo, hi = max(start, first), min(start + count, first + size)
        if lo == first and hi == first + size:  # the whole chunk is ours: the same draw, straight into place
            draw(flat[lo - start:hi - start], generator)
            continue
        values = torch.empty(size, dtype=local.dtype, device=local.device)
        draw(values, generator)
        flat[lo - start:hi - start].copy_(values[lo - first:hi - first])


_FILL_ARGS = {"normal_": (("mean", 0.0), ("std", 1.0)), "uniform_": (("a", "from", 0.0), ("b", "to", 1.0))}
_OTHER_RANDOM_INITS = ("trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                       "xavier_normal_", "orthogonal_", "sparse_", "random_", "bernoulli_", "exponential_")


class _PerNameInit(TorchFunctionMode):
    """While active, normal_/uniform_ fills of the given parameters (nn.init's or the tensor methods) draw from
    per-name generators on the parameter's own device, shard by shard; everything else runs as usual."""

    def __init__(self, params: dict[int, tuple[str, torch.Tensor]], base_seed: int):
        super().__init__()
        self.params, self.base_seed = params, base_seed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        kind = getattr(func, "__name__", "")
        target = kwargs.get("tensor", args[0] if args else None)
        entry = self.params.get(id(target)) if isinstance(target, torch.Tensor) else None
        if entry is None or kind not in _FILL_ARGS and kind not in _OTHER_RANDOM_INITS:
            return func(*args, **kwargs)
        name, param = entry
        if kind in _OTHER_RANDOM_INITS:
            raise NotImplementedError(f"materialize draws only normal_ and uniform_ per parameter name; "
                                      f"{name} asks for {kind}")
        rest = list(args[1:] if args and args[0] is target else args)
        values = []
        for names_and_default in _FILL_ARGS[kind]:
            *names, default = names_and_default
            given = [kwargs[n] for n in names if n in kwargs]
            values.append(given[0] if given else rest.pop(0) if rest else default)
        first, second = values
        if kind == "normal_":
            _fill_random(param, name, self.base_seed, lambda t, g: t.normal_(first, second, generator=g))
        else:
            _fill_random(param, name, self.base_seed, lambda t, g: t.uniform_(first, second, generator=g))
        return target


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate the (possibly sharded) meta parameters on `device` and run the model's own `init_weights()`.

    Every random fill of a parameter draws from generators seeded by the run seed (torch.initial_seed(), which
    the trainer sets from training.seed) and the parameter's name, in fixed chunks of the full tensor, on the
    parameter's device; a sharded parameter (DTensor) draws only the chunks its shard covers. So 1 process,
    N FSDP ranks and HSDP start from identical weights on the same device type, with no full copy of the model
    anywhere. Which model family it is does not matter: it only needs `init_weights()` to fill with nn.init's
    normal_/uniform_ (or the tensor methods), constants and copies.
    """
    device = torch.device(device)
    model.to_empty(device=device)
    params = {id(p): (name.replace("_orig_mod.", ""), p) for name, p in model.named_parameters()}
    with _PerNameInit(params, torch.initial_seed()):
        model.init_weights()
    return model
