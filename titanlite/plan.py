"""`python -m titanlite.plan --job.config_file FILE [--world-size N] [--mfu 0.4] [--gpu h100] [--section.key=v]`

Before renting GPUs: the derived plan (the same block the trainer prints), the estimated memory per GPU and a
wall-clock estimate, without building a model. Every `--section.key=value` of the trainer works here too.

Memory is counted from the architecture, tensor by tensor, as the model's eager autograd keeps them:
- parameters fp32 (the master weights) and gradients fp32, both sharded over the FSDP shard degree;
- optimizer states: AdamW's 2 fp32 moments for the embedding/head/scalar groups, Muon's fp32 momentum plus the
  NorMuon second moment (one value per row or column) for the block matrices, sharded the same way;
- compute-dtype weight copies: with FSDP the unsharded bf16 params of ~2 blocks (current + prefetch) and the
  unsharded head (kept from forward to backward); on one GPU in bf16 every linear's bf16 weight copy, which
  autograd keeps for backward;
- activations at the device batch size (see `saved_per_token_per_layer`), with and without activation
  checkpointing, plus the head (the fused softcap + CE keeps no (tokens, vocab) logits; the plain path keeps
  three fp32 copies) and the backward's working set.
Not counted: the CUDA context and allocator fragmentation (budget a few GiB on a GPU).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from titanlite.attention import uses_banded_sdpa
from titanlite.models.gpt.model import HEAD_CHUNK_ELEMENTS, has_value_embedding

GIB = 2 ** 30
FP32 = 4


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

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states + self.weight_copies

    @property
    def total(self) -> int:
        return self.static + self.activations

    @property
    def total_ac(self) -> int:
        return self.static + self.activations_ac


def saved_per_token_per_layer(n_embd: int, q_dim: int, kv_dim: int, value_embedding: bool,
                              compiled: bool = False) -> int:
    """Compute-dtype elements one block keeps for backward, per token (GPT.forward + Block).

    Eager autograd (checked tensor by tensor with saved_tensors_hooks): attention keeps the mixed residual
    input, its norm (shared by q/k/v), rotated q and k (QK-norm keeps them; RoPE's multiply by the constant
    tables keeps nothing), normed+scaled q and k and v (SDPA's inputs) and the SDPA output (c_proj's input, a
    view); value-embedding layers also keep the embedding rows. MLP: the residual after attention, its norm, the
    relu output (relu's backward), its square (c_proj's input), and the block output (the next layer's lambda
    keeps it).
    Compiled (inductor's partitioner recomputes pointwise ops in backward; an estimate, not measured on CPU): the
    matmul outputs and the norms' inputs stay - mixed input, q/k/v raw, SDPA output, residual after attention,
    MLP hidden, block output.
    """
    ve = kv_dim if value_embedding else 0
    if compiled:
        return n_embd + q_dim + 2 * kv_dim + ve + q_dim + n_embd + 4 * n_embd + n_embd
    attention = 2 * n_embd + 3 * q_dim + 3 * kv_dim + ve
    mlp = n_embd + n_embd + 4 * n_embd + 4 * n_embd + n_embd
    return attention + mlp


def banded_extra_per_token(seq_len: int, window: int, q_dim: int, kv_dim: int) -> float:
    """Extra elements per token a sliding-window layer keeps when SDPA runs it as banded query blocks
    (titanlite.attention): the blocked copy of q, the (2 window)-row key and value bands, and the two output
    pieces next to their concatenation. 0 where the layer runs causal or masked instead."""
    if not uses_banded_sdpa(seq_len, window):
        return 0.0
    blocks = -(-seq_len // window)
    rest = (blocks - 1) * window / seq_len  # share of the rows outside the first block
    return rest * q_dim + 2 * 2 * rest * kv_dim + q_dim


def _fp32_small_per_token_per_layer(n_head: int, n_kv_head: int) -> int:
    """fp32 statistics kept per token: rms_norm's rstd (2 block norms + per-head QK norms) and SDPA's logsumexp."""
    return FP32 * (2 + n_head + n_kv_head + n_head)


def activation_bytes(plan, compute_bytes: int, checkpointed: set[int], fused_head: bool = True,
                     compiled: bool = False, device_type: str = "cuda") -> int:
    """Peak activation memory of one micro-step at plan.device_batch_size (bytes)."""
    C, L = plan.n_embd, plan.n_layer
    q_dim, kv_dim = plan.n_head * plan.head_dim, plan.n_kv_head * plan.head_dim
    tokens = plan.device_batch_size * plan.seq_len
    per_layer = []
    for i in range(L):
        ve = has_value_embedding(i, L)
        full = saved_per_token_per_layer(C, q_dim, kv_dim, ve, compiled) * compute_bytes + \
            _fp32_small_per_token_per_layer(plan.n_head, plan.n_kv_head)
        if i in checkpointed:  # only the block's inputs survive: mixed residual, the previous output, ve rows
            per_layer.append((2 * C + (kv_dim if ve else 0)) * compute_bytes)
        else:
            if device_type == "cpu":  # CPU attention is SDPA: windows go through banded query blocks
                full += banded_extra_per_token(plan.seq_len, plan.window_sizes[i], q_dim, kv_dim) * compute_bytes
            per_layer.append(full)
    # embedding -> norm -> smear (x0) at the bottom, backout + final norm at the top
    ends = 5 * C * compute_bytes
    if fused_head:
        # saved: d(loss)/d(head input), per token, and d(loss)/d(head weight) in fp32 (both formed in forward);
        # transient at the end of forward: a few (chunk, vocab) fp32 buffers, whatever the token count
        head_saved, head_weight_grad = C * compute_bytes, plan.padded_vocab * C * FP32
        chunk = min(HEAD_CHUNK_ELEMENTS.get(device_type, 1 << 24), tokens * plan.padded_vocab)
        forward_transient, backward_head = 2 * chunk * FP32, 0  # tanh and exp(z - c), reused for the gradient
    else:
        # saved: fp32 tanh and log-softmax outputs; transient: matmul output + its fp32 copy, then in backward
        # the two fp32 gradients of the logits
        head_saved, head_weight_grad = 2 * plan.vocab_size * FP32, 0
        forward_transient = tokens * plan.vocab_size * (compute_bytes + FP32)
        backward_head = tokens * plan.vocab_size * 2 * FP32
    saved = tokens * (sum(per_layer) + ends + head_saved) + head_weight_grad
    # backward: a checkpointed block is recomputed in full while it is differentiated, next to the gradients
    # of the largest activations of the block at hand (two MLP-hidden-sized tensors)
    # Eager: measured with the fused relu^2 / RoPE autograd functions (d4, C=128, full AC: 30.6 MB peak), a
    # recomputed block's backward adds about 12 C per token over the saved inputs, far below its 20 C of saved
    # tensors (non-reentrant checkpointing releases each recomputed tensor once backward has used it).
    if compiled:
        recompute = (saved_per_token_per_layer(C, q_dim, kv_dim, True, compiled) * compute_bytes
                     if checkpointed else 0)
        working = 2 * 4 * C * compute_bytes
    else:
        recompute, working = (12 * C * compute_bytes if checkpointed else 0), 0
    backward_peak = saved + max(tokens * (recompute + working), backward_head)
    # the peak is the larger of "end of forward" and "inside backward"
    return max(saved + forward_transient, backward_peak)


def checkpointed_blocks(n_layer: int, mode: str, selective_every: int) -> set[int]:
    if mode == "full":
        return set(range(n_layer))
    if mode == "selective":
        return {i for i in range(n_layer) if i % max(1, selective_every) == 0}
    return set()


def estimate_memory(plan, compute_bytes: int, shard_degree: int, ac_mode: str = "none", selective_every: int = 2,
                    fused_head: bool = True, compiled: bool = False) -> MemoryEstimate:
    p = plan.params
    total = p["total"]
    matrices = p["transformer_matrices"]
    adamw_params = total - matrices
    # NorMuon keeps one value per row (tall/square) or per column (wide) of each block matrix
    C, q_dim, kv_dim = plan.n_embd, plan.n_head * plan.head_dim, plan.n_kv_head * plan.head_dim
    per_layer_rows = q_dim + 2 * kv_dim + C + 4 * C + C   # c_q/c_k/c_v: (out, C) rows; proj (C, q); fc (4C); proj
    second_moment = plan.n_layer * per_layer_rows
    optimizer = FP32 * (2 * adamw_params + matrices + second_moment)
    shard = max(1, shard_degree)
    blocks = max(1, plan.n_layer)
    if shard > 1:  # FSDP: unsharded compute-dtype params of ~2 blocks in flight + the head kept gathered
        weight_copies = compute_bytes * (2 * matrices // blocks + p["lm_head"])
    elif compute_bytes < FP32:  # one device, bf16: each linear's bf16 weight copy is kept for its backward
        weight_copies = compute_bytes * (matrices + p["lm_head"])
    else:
        weight_copies = 0
    asked = checkpointed_blocks(plan.n_layer, ac_mode, selective_every)
    with_ac = asked if asked else checkpointed_blocks(plan.n_layer, "full", 1)
    return MemoryEstimate(
        parameters=FP32 * total // shard, gradients=FP32 * total // shard, optimizer_states=optimizer // shard,
        weight_copies=weight_copies,
        activations=activation_bytes(plan, compute_bytes, set(), fused_head, compiled),
        activations_ac=activation_bytes(plan, compute_bytes, with_ac, fused_head, compiled),
        ac_mode=ac_mode if asked else "full", shard_degree=shard, compute_bytes=compute_bytes, compiled=compiled)


def wall_clock_seconds(plan, mfu: float, peak_flops_per_gpu: float, num_gpus: int) -> float:
    return plan.total_flops / (mfu * peak_flops_per_gpu * num_gpus)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_memory(est: MemoryEstimate, plan, gpu_memory_gib: float | None) -> str:
    dtype = "bf16" if est.compute_bytes == 2 else "fp32"
    fsdp = f"FSDP over {est.shard_degree} ranks" if est.shard_degree > 1 else "one device, no FSDP"
    lines = [
        f"Memory per GPU (estimate; {fsdp}, {dtype} compute, {'compiled' if est.compiled else 'eager'}, device batch {plan.device_batch_size} x "
        f"{plan.seq_len:,} tokens):",
        f"  parameters (fp32 master) : {_gib(est.parameters)}",
        f"  gradients (fp32)         : {_gib(est.gradients)}",
        f"  optimizer states         : {_gib(est.optimizer_states)}  (AdamW 2 moments; Muon momentum + NorMuon)",
        f"  {dtype} weight copies       : {_gib(est.weight_copies)}",
        f"  activations, no AC       : {_gib(est.activations)}",
        f"  {'activations, ' + est.ac_mode + ' AC':<24} : {_gib(est.activations_ac)}",
    ]
    for label, value in (("total, no AC", est.total), (f"total, {est.ac_mode} AC", est.total_ac)):
        verdict = ""
        if gpu_memory_gib:
            verdict = "  fits" if value / GIB <= 0.92 * gpu_memory_gib else "  DOES NOT FIT"
            verdict += f" in {gpu_memory_gib:.0f} GiB"
        lines.append(f"  {label:<24} : {_gib(value)}{verdict}")
    lines.append("  (not counted: CUDA context and allocator fragmentation, budget ~2-4 GiB)")
    return "\n".join(lines)


# GPU memory in GiB, matched like the peak-FLOPs table (first row whose substrings all occur wins)
GPU_MEMORY_GIB = [(("h200",), 141), (("h100", "nvl"), 94), (("h100",), 80), (("h800",), 80), (("a100", "40"), 40),
                  (("a100",), 80), (("b200",), 180), (("gb200",), 186), (("l40",), 48), (("l4",), 24),
                  (("4090",), 24), (("5090",), 32), (("3090",), 24), (("mi300x",), 192)]


def gpu_memory_gib(name: str) -> float | None:
    lowered = name.lower()
    for needles, gib in GPU_MEMORY_GIB:
        if all(n in lowered for n in needles):
            return gib
    return None


def build_report(config, world_size: int, mfu: float, gpu: str) -> dict:
    from titanlite.distributed import resolve_degrees
    from titanlite.errors import UserError
    from titanlite.metrics import peak_flops_for_gpu
    from titanlite.scaling import derive_plan

    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} must be in (0, 1], e.g. 0.4 for 40%")
    plan = derive_plan(config.model, config.training, config.optimizer, config.data.vocab_size, world_size)
    _, shard = resolve_degrees(world_size, config.parallelism.dp_shard, config.parallelism.dp_replicate)
    compute_bytes = FP32 if config.training.dtype == "float32" else 2  # auto plans for a bf16 GPU
    # float8 swaps the head's class, and the model then takes the plain (unfused) head path
    fused = not config.float8.enabled
    from titanlite.models.gpt.parallelize import compile_enabled

    compiled = compile_enabled(config.compile, "cuda")  # the plan is for GPUs: compile "auto" means on
    est = estimate_memory(plan, compute_bytes, shard, config.activation_checkpoint.mode,
                          config.activation_checkpoint.selective_every, fused_head=fused, compiled=compiled)
    peak = peak_flops_for_gpu(gpu)
    if peak == float("inf"):
        raise UserError(f"--gpu {gpu!r} is not in the peak-FLOPs table (titanlite.metrics.PEAK_BF16_FLOPS); "
                        "use a name such as h100, h200, a100, b200")
    return {"plan": plan, "memory": est, "wall_clock_s": wall_clock_seconds(plan, mfu, peak, world_size),
            "peak_flops": peak, "mfu": mfu, "gpu": gpu, "world_size": world_size,
            "gpu_memory_gib": gpu_memory_gib(gpu)}


def format_report(report: dict) -> str:
    from titanlite.scaling import format_plan

    plan, secs = report["plan"], report["wall_clock_s"]
    return "\n".join([
        format_plan(plan),
        format_memory(report["memory"], plan, report["gpu_memory_gib"]),
        f"Wall clock at MFU {100 * report['mfu']:.0f}% on {report['world_size']} x {report['gpu']} "
        f"({report['peak_flops'] / 1e12:,.0f} TFLOP/s bf16 peak each): {secs / 3600:.2f} h ({secs:,.0f} s) for "
        f"{plan.total_flops:.4e} FLOPs",
    ])


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m titanlite.plan", description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=0,
                   help="GPUs (default: parallelism.world_size, or 1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the wall-clock estimate")
    p.add_argument("--gpu", default="h100", help="GPU name for the peak-FLOPs table and memory size")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> int:
    from titanlite.config import load_config
    from titanlite.logging_utils import init_logger, logger

    if any(a in ("-h", "--help") for a in argv):
        parse_args(["--help"])  # prints the planner's flags and exits; config keys: python -m titanlite.train -h
    args, rest = parse_args(argv)
    config = load_config(rest)
    world = args.world_size or (config.parallelism.world_size if config.parallelism.world_size > 0 else 1)
    init_logger()
    logger.info(format_report(build_report(config, world, args.mfu, args.gpu)))
    return 0


if __name__ == "__main__":
    from titanlite.cli import run_cli

    sys.exit(run_cli(main))
