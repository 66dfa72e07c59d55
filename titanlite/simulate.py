"""One real training step at any world size on this machine: fake process group, fake tensors, measured memory.

`simulate_step(config, world_size)` builds the model through `assemble_model` (the trainer's own assembly: float8,
activation checkpointing, FSDP2 / HSDP on the configured `dp_replicate x dp_shard` mesh), builds the optimizers
through `Trainer._build_optimizers` and runs `Trainer.train_step` itself - every micro-step's forward and backward,
FSDP2's all-gathers and reduce-scatters, distributed Muon's all-to-alls and AdamW, the schedules - as rank 0 of a
`fake` process group of `world_size` ranks (every collective returns at once) under `FakeTensorMode` (tensors have
shapes, dtypes and devices but no storage). A MemTracker counts the bytes rank 0 would hold, by kind.

What cannot run this way is replaced, and `SIMULATION_NOTES` says so in every report:
- fake CUDA tensors cannot run autograd on a CPU-only PyTorch (autograd's AccumulateGrad asks for the CUDA device
  guard, which aborts the process), so the step runs on fake CPU tensors with the code paths a GPU takes where the
  model chooses by device (`gpu_code_paths`: the head's CUDA chunk size and layout, PyTorch's rms_norm and
  embedding), and FA3 is stood in for by flash SDPA, which keeps what FA3 keeps (output + log-sum-exp);
- torch.compile needs real kernels: the step is eager (compiled blocks usually keep less);
- float8 runs torchao's emulated matmul (same float8 casts and saved float8 tensors; matmul temporaries differ);
- CUDA context, cuBLAS workspaces, NCCL buffers and allocator fragmentation are not tensors: `gpu_allowance`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from titanlite.assemble import assemble_model
from titanlite.distributed import WorldInfo, build_mesh, resolve_degrees
from titanlite.errors import UserError
from titanlite.models import get_train_spec
from titanlite.scaling import derive_plan

GIB = 2 ** 30

# Not tensors, so not simulated: the CUDA context with cuBLAS/cuDNN workspaces (~0.5-1 GiB on H100), NCCL's
# communication buffers (~0.5-1 GiB at 8-1,024 ranks), and the caching allocator's fragmentation, which
# expandable_segments (set by titanlite on CUDA) keeps to a few percent of the peak.
CUDA_CONTEXT_BYTES = 1 * GIB
NCCL_BUFFER_BYTES = 1 * GIB
FRAGMENTATION_SHARE = 0.05

SIMULATION_NOTES = (
    "simulated on fake CPU tensors with the GPU's code paths (fake CUDA tensors cannot run autograd on a CPU-only "
    "PyTorch): the head's CUDA chunk size and layout, PyTorch's rms_norm and embedding",
    "attention: FA3 stood in for by flash SDPA, which keeps the same output + log-sum-exp for backward",
    "torch.compile is not simulated (inductor needs real kernels): the step runs eagerly",
    "float8: torchao's emulated matmuls (the float8 casts and saved float8 tensors are the real ones)",
    "time: a fake process group moves no data, so no collective's latency is simulated, the stop/save agreement "
    "included (one all-reduce of 4 ints on a gloo group about once a second, titanlite.step_control, not per step)",
)


def gpu_allowance(peak_bytes: int) -> int:
    """Bytes a GPU needs beyond the simulated tensor peak (CUDA context, NCCL buffers, fragmentation)."""
    return CUDA_CONTEXT_BYTES + NCCL_BUFFER_BYTES + int(FRAGMENTATION_SHARE * peak_bytes)


@dataclass
class SimResult:
    world_size: int
    rank: int
    dp_replicate: int
    dp_shard: int
    device_batch_size: int
    ac_mode: str
    micro_steps: int          # micro-steps run (the plan's grad_accum_steps for a full step)
    plan_micro_steps: int
    peak_bytes: int
    breakdown: dict[str, int]  # at the peak: parameters, gradients, optimizer states, activations, temporaries, other
    seconds: float
    fsdp_units: list[str] = field(default_factory=list)
    optimizer_groups: list[tuple[str, str, list[tuple[int, ...]]]] = field(default_factory=list)
    muon_owned: dict[str, int] = field(default_factory=dict)  # shape group -> matrices rank 0 orthogonalises
    static_bytes: dict[str, int] = field(default_factory=dict)  # after the step: parameters, gradients, states


# ----- the GPU's code paths on fake CPU tensors --------------------------------------------------------------

def _flash_attention_stand_in(q, k, v, causal=True, window_size=(-1, 0)):
    """FA3's signature on (B, T, H, D); flash SDPA keeps what FA3 keeps for backward (output + log-sum-exp).
    The window only changes which scores are computed, not what is stored."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                       enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


class _CudaRmsNorm(torch.autograd.Function):
    """Keeps what CUDA's fused rms_norm kernel keeps for backward: the input in its own dtype and the fp32 rstd
    (on CPU, fake or not, F.rms_norm decomposes into fp32 math and keeps an fp32 copy of the input instead)."""

    @staticmethod
    def forward(ctx, x):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
        ctx.save_for_backward(x, rstd)
        return (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd = ctx.saved_tensors
        xn = x.float() * rstd
        g = grad.float()
        return ((g - xn * (g * xn).mean(-1, keepdim=True)) * rstd).to(grad.dtype)


def _gpu_rms_norm(x, scale: float = 1.0, out_dtype: torch.dtype | None = None, copies: int = 1, prefix: int = 0):
    """ops.rms_norm off CPU; its eager fan-out (copies, prefix) keeps the same input + fp32 rstd as this does."""
    y = _CudaRmsNorm.apply(x) if torch.is_grad_enabled() and x.requires_grad else F.rms_norm(x, (x.size(-1),))
    y = (y * scale if scale != 1.0 else y).to(out_dtype or x.dtype)
    outs = (y,) * copies + ((y[..., :prefix],) if prefix else ())
    return outs if len(outs) > 1 else y


def _gpu_rotary_norm(x, cos, sin, scale: float = 1.0):
    from titanlite.models.gpt.ops import apply_rotary

    return _gpu_rms_norm(apply_rotary(x, cos, sin), scale)  # what ops.rotary_norm runs off CPU


def _gpu_embedding(table, idx):
    return F.embedding(idx, table)  # what ops.embedding runs off CPU


@contextlib.contextmanager
def gpu_code_paths():
    """Within: fake CPU tensors take the CUDA branches of the GPT's ops, and FA3 resolves to the stand-in."""
    from titanlite import attention
    from titanlite.models.gpt import model as gpt_model
    from titanlite.models.gpt import ops

    saved = attention._KERNELS.get("fa3"), attention._SOURCES.get("fa3")
    attention._KERNELS["fa3"], attention._SOURCES["fa3"] = _flash_attention_stand_in, "simulation stand-in"
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(ops.HEAD_CHUNK_ELEMENTS, {"cpu": ops.HEAD_CHUNK_ELEMENTS["cuda"]}))
        stack.enter_context(mock.patch.dict(ops.VOCAB_DIM, {"cpu": 1}))
        stack.enter_context(mock.patch.object(gpt_model, "rms_norm", _gpu_rms_norm))
        stack.enter_context(mock.patch.object(gpt_model, "rotary_norm", _gpu_rotary_norm))
        stack.enter_context(mock.patch.object(gpt_model, "embedding", _gpu_embedding))
        try:
            yield
        finally:
            for table, value in zip((attention._KERNELS, attention._SOURCES), saved):
                if value is None:
                    table.pop("fa3", None)
                else:
                    table["fa3"] = value


# ----- the tracker -------------------------------------------------------------------------------------------

def _peak_tracker():
    """MemTracker with only the global peak kept up to date: its per-module peaks walk every module on every op
    (70% of a d26 step's simulation time), and the report needs rank 0's peak only."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakTracker()


_CATEGORIES = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer states",
               "Activation": "activations", "Temp": "temporaries", "Buffer": "other", "Other": "other"}


def _breakdown(snapshot: dict) -> dict[str, int]:
    out = dict.fromkeys(("parameters", "gradients", "optimizer states", "activations", "temporaries", "other"), 0)
    for key, value in snapshot.items():
        name = getattr(key, "value", str(key))
        if name in _CATEGORIES:
            out[_CATEGORIES[name]] += int(value)
    return out


# ----- the fake world ----------------------------------------------------------------------------------------

def _fake_world(world_size: int, dp_shard: int, dp_replicate: int, rank: int = 0) -> WorldInfo:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() != "fake" or dist.get_world_size() != world_size or dist.get_rank() != rank:
            if dist.get_backend() != "fake":
                raise UserError("the simulation needs a process of its own: a real process group is already up")
            dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    replicate, shard = resolve_degrees(world_size, dp_shard, dp_replicate)
    mesh = build_mesh("cpu", world_size, shard, replicate)  # outside fake mode: the mesh holds real rank lists
    return WorldInfo(rank=rank, world_size=world_size, local_rank=0, device=torch.device("cpu"), mesh=mesh,
                     dp_shard=shard, dp_replicate=replicate)


def simulation_config(config):
    """The config the simulated step runs: compile off (not simulable), float8 emulated (no float8 matmul here),
    bf16 compute for training.dtype auto (what an SM80+ GPU resolves it to)."""
    training = config.training
    if training.dtype == "auto":
        training = dataclasses.replace(training, dtype="bfloat16")
    return dataclasses.replace(
        config, compile=dataclasses.replace(config.compile, enabled="false"),
        float8=dataclasses.replace(config.float8, emulate=True), training=training,
        model=dataclasses.replace(config.model, attention_backend="sdpa"))


def _fake_batches(tracker, batch: int, seq_len: int, device):
    def stream():
        while True:
            # MemTracker refuses a root module called twice in one context; each micro-step is a new forward,
            # so its per-module bookkeeping starts over while the global peak carries on
            tracker.reset_mod_stats()
            yield (torch.zeros(batch, seq_len, dtype=torch.long, device=device),
                   torch.zeros(batch, seq_len, dtype=torch.long, device=device))
    return stream()


def fsdp_unit_names(model: torch.nn.Module) -> list[str]:
    return [name or "<root>" for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def optimizer_groups(optimizers) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(optimizer, group name, global parameter shapes) of every group the step's optimizers hold."""
    return [(type(opt).__name__, group.get("name", ""), [tuple(p.shape) for p in group["params"]])
            for opt in optimizers.optimizers for group in opt.param_groups]


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def simulate_step(config, world_size: int, *, micro_steps: int | None = None, rank: int = 0) -> SimResult:
    """One training step of `config` as `rank` of `world_size` fake ranks; `micro_steps` caps the micro-steps run
    (memory from the second micro-step on repeats itself: each holds the previous one's gradients). Rank 0 holds
    the most (first shard rows, first Muon matrices); the last rank the least, possibly nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from titanlite.train import Trainer

    if world_size < 2:
        # one process trains without FSDP; its meta -> fake materialisation trips over FakeTensorMode's weak
        # references (nn.Module._apply cannot swap the tensors), so only sharded worlds are simulated
        raise UserError("--simulate needs --world-size 2 or more (one GPU without FSDP cannot be simulated yet); "
                        "the estimate above covers one GPU")
    start = time.perf_counter()
    backend = simulated_backend(config)
    config = simulation_config(config)
    spec = get_train_spec(config.model.name)
    plan = derive_plan(config.model, config.training, config.optimizer, config.data.vocab_size, world_size, spec)
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of {world_size}")
    world = _fake_world(world_size, config.parallelism.dp_shard, config.parallelism.dp_replicate, rank)
    steps = plan.grad_accum_steps if micro_steps is None else max(1, min(micro_steps, plan.grad_accum_steps))
    trainer = Trainer.__new__(Trainer)  # the trainer's own step and optimizer construction, without data or IO
    trainer.config, trainer.world, trainer.device, trainer.is_main = config, world, world.device, rank == 0
    trainer.spec, trainer.plan, trainer.compute_dtype = spec, plan, torch.bfloat16 \
        if config.training.dtype == "bfloat16" else torch.float32
    with _quiet(), gpu_code_paths(), FakeTensorMode(allow_non_fake_inputs=True):
        trainer.model = assemble_model(spec, plan.model_args, config, world, trainer.compute_dtype, init=False,
                                       announce_kernel=False)
        trainer.model.set_attention_backend(backend)
        trainer.loss_fn = spec.loss
        trainer._build_optimizers()
        tracker = _peak_tracker()
        tracker.track_external(trainer.model, *trainer.optimizers.optimizers)
        trainer.train_streams = {i: _fake_batches(tracker, plan.device_batch_size, plan.seq_len, world.device)
                                 for i in range(steps)}
        with tracker:
            trainer.train_step(0)
        snapshot = tracker._peak_mem_snap.get(world.device, {})
        peak = tracker._peak_mem.get(world.device, 0)
        params = list(trainer.model.parameters())
        static = {"parameters": _local_bytes(params),
                  "gradients": _local_bytes(p.grad for p in params if p.grad is not None),
                  "optimizer states": _local_bytes(_optimizer_state_tensors(trainer.optimizers))}
    muon = trainer.optimizers.muon
    owned = {} if muon is None else {g["name"]: len(layout.owned) for g, layout in
                                     zip(muon.param_groups, getattr(muon, "layouts", ()))}
    return SimResult(world_size=world_size, rank=rank, dp_replicate=world.dp_replicate, dp_shard=world.dp_shard,
                     device_batch_size=plan.device_batch_size, ac_mode=config.activation_checkpoint.mode,
                     micro_steps=steps, plan_micro_steps=plan.grad_accum_steps, peak_bytes=int(peak),
                     breakdown=_breakdown(snapshot), seconds=time.perf_counter() - start,
                     fsdp_units=fsdp_unit_names(trainer.model), optimizer_groups=optimizer_groups(trainer.optimizers),
                     muon_owned=owned, static_bytes=static)


@contextlib.contextmanager
def _quiet():
    """The assembly's start-up lines (float8, AC, FSDP) once per simulated batch would drown the report."""
    from titanlite.logging_utils import logger

    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def simulated_backend(config) -> str:
    """SDPA where it was asked for; else the FA3 stand-in (flash kernels and compiled flex keep the same
    output + log-sum-exp for backward)."""
    return "sdpa" if config.model.attention_backend == "sdpa" else "fa3"


def _optimizer_state_tensors(optimizers):
    for opt in optimizers.optimizers:
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
    muon = optimizers.muon
    if muon is not None:  # NorMuon's second moments live beside the per-parameter state, on their owners
        yield from getattr(muon, "_second_moments", ())
