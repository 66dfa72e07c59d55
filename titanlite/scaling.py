"""The depth dial (recipe §1.1, §2): from `model.depth` to every derived number of a run, with no weights.

`derive_plan` is pure arithmetic (parameter counts and FLOPs are analytic), so a dry run of a d26 config works on
a laptop. `format_plan` renders the block the trainer prints at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

from titanlite.errors import UserError
from titanlite.models.gpt.model import GPTArgs, count_flops_per_token, count_params, window_sizes
from titanlite.optim.builder import group_learning_rates

REFERENCE_DEPTH = 12            # hyperparameters were tuned at d12; everything scales relative to it
REFERENCE_BATCH = 2 ** 19       # tokens per step at d12
BATCH_SIZE_EXPONENT = 0.383     # Power Lines: B_opt ∝ D^0.383
REFERENCE_WIDTH = 768


@dataclass(frozen=True)
class Plan:
    # model dims
    depth: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    padded_vocab: int
    seq_len: int
    window_pattern: str
    window_sizes: tuple[int, ...]
    # size and cost
    params: dict[str, int]              # wte, value_embeds, lm_head, transformer_matrices, scalars, total
    scaling_params: int
    reference_scaling_params: int       # the same architecture at depth 12
    flops_per_token: int
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
    width_lr_scale: float               # (C / 768) ^ -0.5, embedding-type groups only
    weight_decay: float
    weight_decay_scaled: float          # wd * sqrt(B / 2^19) * N12 / N (Muon)
    group_lrs: dict[str, float]         # initial LR per optimizer group, exactly as the optimizers get them

    @property
    def full_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.window_sizes) if w >= self.seq_len]


def model_dims(depth: int, aspect_ratio: int, head_dim: int) -> tuple[int, int]:
    """(n_embd, n_head): width = depth * aspect_ratio rounded up to a multiple of head_dim."""
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return n_embd, n_embd // head_dim


def auto_total_batch_size(scaling_params: int, reference_scaling_params: int) -> int:
    """2^round(log2(2^19 · (N / N12)^0.383)); D/D_REF = N/N12 because the ratio cancels."""
    target = REFERENCE_BATCH * (scaling_params / reference_scaling_params) ** BATCH_SIZE_EXPONENT
    return 2 ** round(math.log2(target))


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"{name} = {value} must be a positive integer")


def derive_plan(model_cfg, training_cfg, optimizer_cfg, vocab_size: int, world_size: int) -> Plan:
    for name, value in (("model.depth", model_cfg.depth), ("model.aspect_ratio", model_cfg.aspect_ratio),
                        ("model.head_dim", model_cfg.head_dim), ("model.max_seq_len", model_cfg.max_seq_len),
                        ("training.device_batch_size", training_cfg.device_batch_size),
                        ("data.vocab_size", vocab_size), ("world size", world_size)):
        _check_positive(name, value)
    if model_cfg.head_dim % 2:
        raise UserError(f"model.head_dim = {model_cfg.head_dim} must be even (rotary embeddings rotate pairs)")
    n_embd, n_head = model_dims(model_cfg.depth, model_cfg.aspect_ratio, model_cfg.head_dim)
    seq_len = model_cfg.max_seq_len
    args = GPTArgs(n_layer=model_cfg.depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head,
                   head_dim=model_cfg.head_dim, vocab_size=vocab_size, sequence_len=seq_len,
                   window_pattern=model_cfg.window_pattern.upper(), softcap=model_cfg.softcap)
    params = count_params(args)
    scaling_params = params["transformer_matrices"] + params["lm_head"]
    ref_embd, ref_head = model_dims(REFERENCE_DEPTH, model_cfg.aspect_ratio, model_cfg.head_dim)
    ref_params = count_params(replace(args, n_layer=REFERENCE_DEPTH, n_embd=ref_embd, n_head=ref_head,
                                      n_kv_head=ref_head))
    reference_scaling_params = ref_params["transformer_matrices"] + ref_params["lm_head"]
    flops_per_token = count_flops_per_token(args)

    auto_batch = training_cfg.total_batch_size <= 0
    total_batch_size = (auto_total_batch_size(scaling_params, reference_scaling_params) if auto_batch
                        else training_cfg.total_batch_size)
    micro = training_cfg.device_batch_size * seq_len * world_size
    if total_batch_size % micro:
        raise UserError(
            f"total batch size {total_batch_size:,} tokens{' (auto)' if auto_batch else ''} is not a multiple of "
            f"device_batch_size x max_seq_len x world_size = {training_cfg.device_batch_size} x {seq_len} x "
            f"{world_size} = {micro:,}; change training.total_batch_size or training.device_batch_size")
    grad_accum_steps = total_batch_size // micro

    ratio = training_cfg.target_param_data_ratio
    if training_cfg.num_iterations > 0:
        num_iterations, source = training_cfg.num_iterations, "num_iterations"
    elif training_cfg.target_flops > 0:
        num_iterations = round(training_cfg.target_flops / (flops_per_token * total_batch_size))
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
    width_lr_scale = (n_embd / REFERENCE_WIDTH) ** -0.5
    wd = optimizer_cfg.weight_decay
    scales = SimpleNamespace(batch_lr_scale=batch_lr_scale, width_lr_scale=width_lr_scale)
    return Plan(
        depth=model_cfg.depth, n_layer=model_cfg.depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head,
        head_dim=model_cfg.head_dim, vocab_size=vocab_size, padded_vocab=args.padded_vocab, seq_len=seq_len,
        window_pattern=args.window_pattern,
        window_sizes=tuple(window_sizes(args.n_layer, seq_len, args.window_pattern)),
        params=params, scaling_params=scaling_params, reference_scaling_params=reference_scaling_params,
        flops_per_token=flops_per_token,
        total_batch_size=total_batch_size, auto_batch_size=auto_batch,
        device_batch_size=training_cfg.device_batch_size, world_size=world_size, tokens_per_micro_step=micro,
        grad_accum_steps=grad_accum_steps,
        num_iterations=num_iterations, horizon_source=source, total_tokens=total_tokens,
        tokens_per_param=total_tokens / scaling_params, total_flops=float(flops_per_token) * total_tokens,
        batch_lr_scale=batch_lr_scale, width_lr_scale=width_lr_scale, weight_decay=wd,
        weight_decay_scaled=wd * batch_lr_scale * reference_scaling_params / scaling_params,
        group_lrs=group_learning_rates(optimizer_cfg, scales),
    )


def format_plan(plan: Plan) -> str:
    """One block: integers in full, FLOPs with 5 significant digits."""
    p = plan.params
    batch_note = f"auto, 2^{int(math.log2(plan.total_batch_size))}" if plan.auto_batch_size else "set by user"
    short = sorted({w for w in plan.window_sizes if w < plan.seq_len})
    windows = (f"pattern {plan.window_pattern}, short window {', '.join(f'{w:,}' for w in short) or 'none'}, "
               f"full layers {', '.join(map(str, plan.full_layers))}")
    lines = [
        f"Plan for depth {plan.depth}:",
        f"  model             : depth {plan.depth} | width {plan.n_embd:,} | heads {plan.n_head} x {plan.head_dim} "
        f"(kv heads {plan.n_kv_head}) | seq_len {plan.seq_len:,} | vocab {plan.vocab_size:,} "
        f"(padded {plan.padded_vocab:,})",
        f"  attention windows : {windows}",
        "  params            : " + " | ".join(f"{k} {v:,}" for k, v in p.items()),
        f"  scaling params    : {plan.scaling_params:,} (transformer matrices + lm_head; d12 reference "
        f"{plan.reference_scaling_params:,})",
        f"  FLOPs per token   : {plan.flops_per_token:.4e}",
        f"  tokens per step   : {plan.total_batch_size:,} ({batch_note}) = {plan.device_batch_size} seqs x "
        f"{plan.seq_len:,} tokens x {plan.world_size} ranks x {plan.grad_accum_steps} micro-steps",
        f"  grad accumulation : {plan.grad_accum_steps:,} steps",
        f"  iterations        : {plan.num_iterations:,} (from training.{plan.horizon_source})",
        f"  total tokens      : {plan.total_tokens:,}",
        f"  tokens:params     : {plan.tokens_per_param:.2f}",
        f"  total FLOPs       : {plan.total_flops:.4e}",
        f"  LR scales         : batch {plan.batch_lr_scale:.4f} | width {plan.width_lr_scale:.4f}",
        "  group LRs         : " + " | ".join(f"{name} {lr:.6g}" for name, lr in plan.group_lrs.items())
        + " (matrices: x sqrt(max(1, rows/cols)) per shape)",
        f"  weight decay      : {plan.weight_decay:g} -> {plan.weight_decay_scaled:.6g} (scaled, Muon)",
    ]
    return "\n".join(lines)
