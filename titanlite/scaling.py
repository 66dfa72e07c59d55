"""The depth dial (docs/recipe.md §1.1, §2): from `model.depth` to every derived number of a run, with no weights.

Model-agnostic arithmetic over what the family's TrainSpec reports (its args, parameter counts, scaling
parameters, FLOPs per token, width and optimizer groups), so a dry run of a d26 config works on a laptop and
the plan prints exactly the numbers the trainer and the optimizers use. `format_plan` renders the block the
trainer prints at start.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from titanlite.errors import UserError
from titanlite.models import get_train_spec
from titanlite.spec import GroupSettings, LRScales, TrainSpec

REFERENCE_DEPTH = 12            # hyperparameters were tuned at d12; everything scales relative to it
REFERENCE_BATCH = 2 ** 19       # tokens per step at d12
BATCH_SIZE_EXPONENT = 0.383     # Power Lines: B_opt ∝ D^0.383
REFERENCE_WIDTH = 768


@dataclass(frozen=True)
class Plan:
    # model
    model_name: str
    model_args: Any                     # the family's args dataclass (TrainSpec.build_args)
    model_lines: tuple[str, ...]        # the family's own plan lines (TrainSpec.describe)
    depth: int
    vocab_size: int
    seq_len: int
    # size and cost
    params: dict[str, int]              # by the family's groups, with "total"
    scaling_params: int
    reference_scaling_params: int       # the same architecture at depth 12
    flops_per_token: int
    width: int
    # batch
    total_batch_size: int
    auto_batch_size: bool
    device_batch_size: int
    world_size: int
    tokens_per_micro_step: int          # device_batch_size * seq_len * world_size
    grad_accum_steps: int
    # horizon
    num_iterations: int
    horizon_source: str                 # num_iterations | target_flops | target_param_data_ratio
    total_tokens: int
    tokens_per_param: float
    total_flops: float
    # hyperparameter scaling (§2.6)
    batch_lr_scale: float               # sqrt(B / 2^19)
    width_lr_scale: float               # (width / 768) ^ -0.5, embedding-type groups only
    weight_decay: float
    weight_decay_scaled: float          # wd * sqrt(B / 2^19) * N12 / N (Muon)
    groups: dict[str, GroupSettings]    # every optimizer group exactly as the optimizers are built with it
    batch_note: str = ""                # what the automatic batch changed to fit the world size, if anything

    @property
    def group_lrs(self) -> dict[str, float]:
        return {name: group.lr for name, group in self.groups.items()}


def auto_total_batch_size(scaling_params: int, reference_scaling_params: int) -> int:
    """2^round(log2(2^19 · (N / N12)^0.383)); D/D_REF = N/N12 because the ratio cancels."""
    target = REFERENCE_BATCH * (scaling_params / reference_scaling_params) ** BATCH_SIZE_EXPONENT
    return 2 ** round(math.log2(target))


def fit_batch_to_world(total: int, device_batch: int, seq_len: int, world_size: int,
                       auto_batch: bool) -> tuple[int, int, str]:
    """(total batch, device batch, note): every rank's micro-steps must tile the total batch exactly.

    An automatic total batch is the planner's to fit: the device batch is lowered to the largest that divides it
    (a smaller device batch only adds micro-steps), and where even one sequence per rank is more than the
    automatic batch (2^20 tokens over 2,048-token sequences stops dividing beyond 512 ranks) the total batch
    rises to the smallest multiple of one sequence per rank, and the note says so. A total batch the user set is
    theirs: a mismatch stops with one line naming the setting that works.
    """
    sequence_step = seq_len * world_size  # one sequence on every rank
    if total % (device_batch * sequence_step) == 0:
        return total, device_batch, ""
    fitting = [b for b in range(device_batch, 0, -1) if total % (b * sequence_step) == 0]
    if not auto_batch:
        hint = (f"--training.device_batch_size={fitting[0]}" if fitting else
                f"--training.total_batch_size={-(-total // sequence_step) * sequence_step} (a multiple of "
                f"max_seq_len x world_size = {sequence_step:,})")
        raise UserError(
            f"total batch size {total:,} tokens is not a multiple of device_batch_size x max_seq_len x world_size "
            f"= {device_batch} x {seq_len} x {world_size} = {device_batch * sequence_step:,}; set {hint}")
    if fitting:
        return total, fitting[0], (f"device batch {device_batch} -> {fitting[0]} so that the auto total batch "
                                   f"divides over {world_size:,} ranks")
    raised = -(-total // sequence_step) * sequence_step
    batch = next(b for b in range(device_batch, 0, -1) if raised % (b * sequence_step) == 0)
    return raised, batch, (f"auto total batch {total:,} raised to {raised:,} tokens: one {seq_len:,}-token "
                           f"sequence on each of {world_size:,} ranks is {sequence_step:,}; set "
                           f"--training.total_batch_size to choose another multiple of it")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"{name} = {value} must be a positive integer")


def derive_plan(model_cfg, training_cfg, optimizer_cfg, vocab_size: int, world_size: int,
                spec: TrainSpec | None = None) -> Plan:
    for name, value in (("model.depth", model_cfg.depth), ("model.aspect_ratio", model_cfg.aspect_ratio),
                        ("model.head_dim", model_cfg.head_dim), ("model.max_seq_len", model_cfg.max_seq_len),
                        ("training.device_batch_size", training_cfg.device_batch_size),
                        ("data.vocab_size", vocab_size), ("world size", world_size)):
        _check_positive(name, value)
    spec = spec or get_train_spec(model_cfg.name)
    args = spec.build_args(model_cfg, vocab_size)
    counts = spec.counts(args)
    reference = spec.counts(spec.build_args(dataclasses.replace(model_cfg, depth=REFERENCE_DEPTH), vocab_size))
    scaling_params, reference_scaling_params = counts.scaling_params, reference.scaling_params
    seq_len = model_cfg.max_seq_len

    auto_batch = training_cfg.total_batch_size <= 0
    total_batch_size = (auto_total_batch_size(scaling_params, reference_scaling_params) if auto_batch
                        else training_cfg.total_batch_size)
    total_batch_size, device_batch_size, batch_note = fit_batch_to_world(
        total_batch_size, training_cfg.device_batch_size, seq_len, world_size, auto_batch)
    micro = device_batch_size * seq_len * world_size
    grad_accum_steps = total_batch_size // micro

    ratio = training_cfg.target_param_data_ratio
    if training_cfg.num_iterations > 0:
        num_iterations, source = training_cfg.num_iterations, "num_iterations"
    elif training_cfg.target_flops > 0:
        num_iterations = round(training_cfg.target_flops / (counts.flops_per_token * total_batch_size))
        source = "target_flops"
    elif ratio > 0:
        num_iterations, source = int(ratio * scaling_params) // total_batch_size, "target_param_data_ratio"
    else:
        raise UserError("no training horizon: training.num_iterations, training.target_flops and "
                        "training.target_param_data_ratio are all <= 0; set one of them to a positive value")
    if num_iterations < 1:
        raise UserError(f"the horizon from training.{source} gives {num_iterations} steps at "
                        f"{total_batch_size:,} tokens per step; raise it or lower training.total_batch_size")
    total_tokens = total_batch_size * num_iterations

    batch_lr_scale = math.sqrt(total_batch_size / REFERENCE_BATCH)
    width_lr_scale = (counts.width / REFERENCE_WIDTH) ** -0.5
    wd = optimizer_cfg.weight_decay
    weight_decay_scaled = wd * batch_lr_scale * reference_scaling_params / scaling_params
    scales = LRScales(batch=batch_lr_scale, width=width_lr_scale, muon_weight_decay=weight_decay_scaled)
    return Plan(
        model_name=spec.name, model_args=args, model_lines=tuple(spec.describe(args)), depth=model_cfg.depth,
        vocab_size=vocab_size, seq_len=seq_len,
        params=counts.params, scaling_params=scaling_params, reference_scaling_params=reference_scaling_params,
        flops_per_token=counts.flops_per_token, width=counts.width,
        total_batch_size=total_batch_size, auto_batch_size=auto_batch,
        device_batch_size=device_batch_size, world_size=world_size, tokens_per_micro_step=micro,
        grad_accum_steps=grad_accum_steps,
        num_iterations=num_iterations, horizon_source=source, total_tokens=total_tokens,
        tokens_per_param=total_tokens / scaling_params, total_flops=float(counts.flops_per_token) * total_tokens,
        batch_lr_scale=batch_lr_scale, width_lr_scale=width_lr_scale, weight_decay=wd,
        weight_decay_scaled=weight_decay_scaled, groups=spec.optimizer_groups(optimizer_cfg, scales),
        batch_note=batch_note,
    )


def format_plan(plan: Plan) -> str:
    """One block: integers in full, FLOPs with 5 significant digits."""
    p = plan.params
    exponent = math.log2(plan.total_batch_size)
    batch_note = (("auto, " + (f"2^{int(exponent)}" if exponent.is_integer() else "raised")) if plan.auto_batch_size
                  else "set by user")
    muon = [name for name, g in plan.groups.items() if g.optimizer == "muon"]
    lines = [
        f"Plan for depth {plan.depth}:",
        *(f"  {line}" for line in plan.model_lines),
        "  params            : " + " | ".join(f"{k} {v:,}" for k, v in p.items()),
        f"  scaling params    : {plan.scaling_params:,} (d12 reference {plan.reference_scaling_params:,})",
        f"  FLOPs per token   : {plan.flops_per_token:.4e}",
        f"  tokens per step   : {plan.total_batch_size:,} ({batch_note}) = {plan.device_batch_size} seqs x "
        f"{plan.seq_len:,} tokens x {plan.world_size} ranks x {plan.grad_accum_steps} micro-steps",
        *([f"  batch fitted      : {plan.batch_note}"] if plan.batch_note else []),
        f"  grad accumulation : {plan.grad_accum_steps:,} steps",
        f"  iterations        : {plan.num_iterations:,} (from training.{plan.horizon_source})",
        f"  total tokens      : {plan.total_tokens:,}",
        f"  tokens:params     : {plan.tokens_per_param:.2f}",
        f"  total FLOPs       : {plan.total_flops:.4e}",
        f"  LR scales         : batch {plan.batch_lr_scale:.4f} | width {plan.width_lr_scale:.4f}",
        "  group LRs         : " + " | ".join(f"{name} {lr:.6g}" for name, lr in plan.group_lrs.items())
        + (f" ({', '.join(muon)}: x sqrt(max(1, rows/cols)) per shape)" if muon else ""),
        f"  weight decay      : {plan.weight_decay:g} -> {plan.weight_decay_scaled:.6g} (scaled, Muon)",
    ]
    return "\n".join(lines)
