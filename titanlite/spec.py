"""TrainSpec: everything model-specific, in one object per model family.

The trainer, the planner, the evaluators and export know a model only through its TrainSpec: how the depth dial
becomes the family's args, what the model counts (parameters by group, scaling parameters, FLOPs per token),
which optimizer each parameter group gets with which LR/betas/weight decay, how it is parallelized, and how it
is exported. The registry of families is `titanlite.models` (one line per family).

A model class a spec names implements this protocol (the trainer calls it directly):
    Model(args)                                  construction, on the meta device
    init_weights()                               after to_empty: every parameter and buffer (normal_/uniform_
                                                 fills are drawn per parameter name by materialize)
    init_buffers()                               non-persistent buffers only (export/load)
    set_compute_dtype(dtype), compute_dtype      activations/matmuls; parameters stay fp32
    set_attention_backend(name)                  a name from titanlite.attention.select_attention_backend
    forward(idx, targets=None, loss_reduction="mean", kv_cache=None)
                                                 logits (B, T, vocab) in fp32, or the loss (ignore_index -1)
    optimizer_param_groups() -> {group: [params]}  the groups the spec's optimizer_groups names
    new_kv_cache(batch_size, max_len)            a titanlite.generate.KVCache for decoding
    max_positions                                the longest sequence forward accepts
    blocks                                       nn.ModuleList of the repeated blocks (AC, compile, FSDP units)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

ADAMW, MUON = "adamw", "muon"


@dataclass(frozen=True)
class ModelCounts:
    """What the planner needs from a model, computed from its args without weights."""
    params: dict[str, int]   # by group, with "total"
    scaling_params: int      # N of the tokens:params ratio and of the batch-size rule
    flops_per_token: int     # training FLOPs per token: 6 x matmul weights + attention
    width: int               # residual stream width, for the embedding-type LR width scaling


@dataclass(frozen=True)
class LRScales:
    """The recipe's hyperparameter scaling, the same for every family (titanlite.scaling computes it)."""
    batch: float              # sqrt(B / 2^19): every LR
    width: float              # (width / 768) ^ -0.5: embedding-type LRs
    muon_weight_decay: float  # weight_decay x batch x N(d12) / N: the matrices' decoupled weight decay


@dataclass(frozen=True)
class GroupSettings:
    """One optimizer parameter group as the optimizers are built with it (and as the plan prints it)."""
    optimizer: str                        # ADAMW or MUON
    lr: float                             # initial LR (Muon: before its per-shape sqrt(max(1, rows/cols)))
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW only; Muon's momentum follows lr_scheduler.momentum_*
    weight_decay: float = 0.0


# (model section, vocab size) -> the family's args dataclass
BuildArgsFn = Callable[[Any, int], Any]
# (model, world, compile, float8, activation_checkpoint sections, param_dtype=) -> the model, parallelized in place
ParallelizeFn = Callable[..., nn.Module]
# (optimizer section, LRScales) -> {group name: GroupSettings}
OptimizerGroupsFn = Callable[[Any, LRScales], dict[str, GroupSettings]]
# (model, inputs (B, T), targets (B, T)) -> SUM of token losses; the trainer divides by the global token count
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HFModelFiles:
    """A family's model in Hugging Face form (titanlite.hf.export writes it with the tokenizer files)."""
    config: dict                         # config.json: architectures, model_type, dims (token ids added by export)
    tensors: dict[str, torch.Tensor]     # model.safetensors: HF names and layouts, fp32
    code_files: tuple = ()               # Paths copied into the folder (custom architectures: trust_remote_code)


# (family args, {titanlite name: full fp32 tensor}) -> HFModelFiles
ToHFFn = Callable[[Any, dict[str, torch.Tensor]], HFModelFiles]


def forward_sum_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model computes the loss in forward, so a fused head + CE runs inside its (compiled) graph."""
    return model(inputs, targets, loss_reduction="sum")


@dataclass(frozen=True)
class TrainSpec:
    name: str
    model_args_cls: type                         # args dataclass: checkpoints and exports store it as a dict
    model_cls: type[nn.Module]
    build_args: BuildArgsFn
    counts: Callable[[Any], ModelCounts]
    describe: Callable[[Any], list[str]]         # the plan's lines about the architecture
    optimizer_groups: OptimizerGroupsFn
    parallelize: ParallelizeFn
    window_pattern: Callable[[Any], str] = lambda args: "L"  # S = sliding window layers (attention kernel choice)
    # (plan, compute bytes, shard degree, ac mode, selective_every, fused_head, compiled) -> MemoryEstimate
    estimate_memory: Callable[..., Any] | None = None
    loss: LossFn = forward_sum_loss
    export_format: str = ""
    to_hf: ToHFFn | None = None                  # `scripts.export --format hf`; None: the family has no HF form

    def build_meta_model(self, args) -> nn.Module:
        """The model with no storage; titanlite.models.build.materialize makes it real."""
        with torch.device("meta"):
            return self.model_cls(args)

    def args_from_dict(self, values: dict, **changes):
        known = {f.name for f in dataclasses.fields(self.model_args_cls)}
        return self.model_args_cls(**{k: v for k, v in {**values, **changes}.items() if k in known})


def adam_betas(optimizer_cfg) -> tuple[tuple[float, float], tuple[float, float]]:
    """(unembedding, embedding) AdamW betas: the seed's adam_beta1/adam_beta2, unless the per-group beta2 keys
    (unembedding_beta2 / embedding_beta2, -1 = unset) give the later recipe's values."""
    cfg = optimizer_cfg
    unembedding_beta2 = cfg.adam_beta2 if cfg.unembedding_beta2 < 0 else cfg.unembedding_beta2
    embedding_beta2 = cfg.adam_beta2 if cfg.embedding_beta2 < 0 else cfg.embedding_beta2
    return (cfg.adam_beta1, unembedding_beta2), (cfg.adam_beta1, embedding_beta2)


def width_and_heads(depth: int, aspect_ratio: int, head_dim: int) -> tuple[int, int]:
    """The recipe's width rule, for families that use it: width = depth x aspect_ratio rounded up to a multiple
    of head_dim; heads = width / head_dim."""
    width = -(-depth * aspect_ratio // head_dim) * head_dim
    return width, width // head_dim


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU."""
    parameters: int
    gradients: int
    optimizer_states: int
    weight_copies: int          # compute-dtype copies of weights alive during a step
    activations: int            # at the device batch size, no activation checkpointing
    activations_ac: int         # with the checkpointing mode asked for (full if none was asked)
    ac_mode: str
    shard_degree: int
    compute_bytes: int
    compiled: bool = False
    # With gradient accumulation the gradients of the earlier micro-steps are held through the last one's forward;
    # with a single micro-step they only grow while backward frees the activations (measured by the simulated
    # step, titanlite.simulate: d26 on 1,024 ranks peaks 0.78 GiB under parameters + gradients + activations).
    accumulates: bool = True

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states + self.weight_copies

    def _peak(self, activations: int) -> int:
        if self.accumulates:
            return self.static + activations
        return self.static - self.gradients + max(self.gradients, activations)

    @property
    def total(self) -> int:
        return self._peak(self.activations)

    @property
    def total_ac(self) -> int:
        return self._peak(self.activations_ac)


def checkpointed_blocks(n_layer: int, mode: str, selective_every: int) -> set[int]:
    if mode == "full":
        return set(range(n_layer))
    if mode == "selective":
        return {i for i in range(n_layer) if i % max(1, selective_every) == 0}
    return set()


def weight_copy_bytes(compute_bytes: int, shard: int, matrices: int, n_layer: int, lm_head: int) -> int:
    """Compute-dtype weight copies alive during a step. FSDP: the unsharded blocks in flight (the current one and
    the prefetched next) plus the head kept gathered; one device in bf16: each linear's bf16 copy is kept for its
    backward; one device in fp32: none (the masters are used directly)."""
    if shard > 1:
        return compute_bytes * (2 * matrices // max(1, n_layer) + lm_head)
    if compute_bytes < 4:
        return compute_bytes * (matrices + lm_head)
    return 0


def build_memory_estimate(plan, compute_bytes: int, shard_degree: int, ac_mode: str, selective_every: int,
                          optimizer_bytes: int, activations: Callable[[set[int]], int],
                          compiled: bool = False) -> MemoryEstimate:
    """What every family's estimate shares: fp32 master weights, fp32 gradients and the optimizer states (its
    unsharded `optimizer_bytes`) sharded over the FSDP shard degree, the compute-dtype weight copies, and the
    family's `activations(checkpointed block indices)` without checkpointing and with the mode asked for (full
    when none was)."""
    p, n_layer = plan.params, plan.model_args.n_layer
    shard = max(1, shard_degree)
    asked = checkpointed_blocks(n_layer, ac_mode, selective_every)
    with_ac = asked if asked else checkpointed_blocks(n_layer, "full", 1)
    return MemoryEstimate(
        parameters=4 * p["total"] // shard, gradients=4 * p["total"] // shard,
        optimizer_states=optimizer_bytes // shard,
        weight_copies=weight_copy_bytes(compute_bytes, shard, p["transformer_matrices"], n_layer, p["lm_head"]),
        activations=activations(set()), activations_ac=activations(with_ac),
        ac_mode=ac_mode if asked else "full", shard_degree=shard, compute_bytes=compute_bytes, compiled=compiled,
        accumulates=plan.grad_accum_steps > 1)
