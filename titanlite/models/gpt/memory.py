"""The GPT's memory per GPU for the planner (python -m titanlite.plan), counted tensor by tensor.

- parameters fp32 (the master weights) and gradients fp32, both sharded over the FSDP shard degree;
- optimizer states: AdamW's 2 fp32 moments for the embedding/head/scalar groups, Muon's fp32 momentum plus the
  NorMuon second moment (one value per row or column) for the block matrices, sharded the same way;
- compute-dtype weight copies: with FSDP the unsharded bf16 params of ~2 blocks (current + prefetch) and the
  unsharded head (kept from forward to backward); on one GPU in bf16 every linear's bf16 weight copy, which
  autograd keeps for backward;
- activations at the device batch size (see `saved_per_token_per_layer`), with and without activation
  checkpointing, with the residual stream kept in fp32 in one-process bf16 runs (GPT.forward), plus the head (the fused softcap + CE keeps no (tokens, vocab) logits; the plain path keeps
  three fp32 copies) and the backward's working set.
Not counted: the CUDA context and allocator fragmentation (budget a few GiB on a GPU).
"""

from __future__ import annotations

from titanlite.attention import uses_banded_sdpa, uses_causal_halves
from titanlite.models.gpt.model import VE_GATE_CHANNELS, has_value_embedding, window_sizes
from titanlite.models.gpt.ops import HEAD_CHUNK_ELEMENTS
from titanlite.spec import MemoryEstimate, build_memory_estimate

FP32 = 4


def saved_per_token_per_layer(n_embd: int, q_dim: int, kv_dim: int, value_embedding: bool,
                              compiled: bool = False, fused_norm: bool = False) -> int:
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
    fused_norm (eager on CPU, titanlite's RMSNorm function): the norms keep their outputs, which the next
    matmul or SDPA keeps anyway, instead of their inputs: the mixed residual input, the rotated q and k and
    the residual after attention are no longer kept.
    """
    ve = kv_dim if value_embedding else 0
    if compiled:
        return n_embd + q_dim + 2 * kv_dim + ve + q_dim + n_embd + 4 * n_embd + n_embd
    attention = 2 * n_embd + 3 * q_dim + 3 * kv_dim + ve
    mlp = n_embd + n_embd + 4 * n_embd + 4 * n_embd + n_embd
    if fused_norm:
        attention -= n_embd + q_dim + kv_dim
        mlp -= n_embd
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


def causal_halves_extra_per_token(seq_len: int, window: int, q_dim: int) -> int:
    """Extra elements per token a full-context layer keeps when CPU SDPA runs it as two query halves
    (titanlite.attention): the two output halves, which SDPA's backward keeps, next to their concatenation."""
    return q_dim if window >= seq_len - 1 and uses_causal_halves(seq_len, "cpu") else 0


def _fp32_small_per_token_per_layer(n_head: int, n_kv_head: int) -> int:
    """fp32 statistics kept per token: rms_norm's rstd (2 block norms + per-head QK norms) and SDPA's logsumexp."""
    return FP32 * (2 + n_head + n_kv_head + n_head)


def activation_bytes(plan, compute_bytes: int, checkpointed: set[int], fused_head: bool = True,
                     compiled: bool = False, device_type: str = "cuda") -> int:
    """Peak activation memory of one micro-step at plan.device_batch_size (bytes)."""
    a = plan.model_args
    C, L = a.n_embd, a.n_layer
    q_dim, kv_dim = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    windows = window_sizes(L, a.sequence_len, a.window_pattern)
    tokens = plan.device_batch_size * plan.seq_len
    fused_norm = device_type == "cpu" and not compiled  # titanlite.models.gpt.ops.rms_norm
    # GPT.forward keeps the residual stream, x0 and the value-embedding rows in fp32 when the compute dtype is
    # narrower; under FSDP (2+ ranks) each block's inputs are cast to bf16 by its mixed-precision policy, so the
    # fp32 copies are the blocks' own only in one-process runs
    stream_bytes = FP32 if plan.world_size == 1 else compute_bytes
    widened = stream_bytes - compute_bytes
    per_layer = []
    for i in range(L):
        ve = has_value_embedding(i, L)
        full = saved_per_token_per_layer(C, q_dim, kv_dim, ve, compiled, fused_norm) * compute_bytes + \
            _fp32_small_per_token_per_layer(a.n_head, a.n_kv_head)
        if widened:  # the block output and the ve rows are kept in fp32, and so are the mixed input and the
            # residual after attention: by the fused norm, which keeps a wider input (not its output) - two
            # tensors saved_per_token_per_layer leaves out for it - or else at fp32 instead of compute bytes
            full += widened * (C + (kv_dim if ve else 0)) + 2 * C * (stream_bytes if fused_norm else widened)
        if i in checkpointed:  # only the block's inputs survive: mixed residual, the previous output, ve rows
            per_layer.append((2 * C + (kv_dim if ve else 0)) * stream_bytes)
        else:
            if device_type == "cpu":  # CPU attention is SDPA: banded query blocks or causal query halves
                full += (banded_extra_per_token(plan.seq_len, windows[i], q_dim, kv_dim)
                         + causal_halves_extra_per_token(plan.seq_len, windows[i], q_dim)) * compute_bytes
            per_layer.append(full)
    # embedding -> norm -> smear (x0) at the bottom, backout + final norm at the top; the fused norm keeps the
    # embedding norm's output (which smear keeps too) instead of the raw embedding
    ends = (4 if fused_norm else 5) * C * stream_bytes
    if fused_head:
        # saved: d(loss)/d(head input), per token, and d(loss)/d(head weight) in fp32 (both formed in forward);
        # transient at the end of forward: a few (chunk, vocab) fp32 buffers, whatever the token count
        head_saved, head_weight_grad = C * compute_bytes, a.padded_vocab * C * FP32
        chunk = min(HEAD_CHUNK_ELEMENTS.get(device_type, 1 << 24), tokens * a.padded_vocab)
        # two fp32 buffers (the sigmoid and exp(z - c), reused for the gradient), and in bf16 the chunk's bf16
        # logits next to them (their fp32 copy is the sigmoid's; fp32 logits are that buffer): measured by the
        # simulated step (titanlite.simulate), 0.125 GiB at d12 x 1,024 ranks
        logits = compute_bytes if compute_bytes < FP32 else 0
        forward_transient, backward_head = chunk * (2 * FP32 + logits), 0
    else:
        # saved: fp32 tanh and log-softmax outputs; transient: matmul output + its fp32 copy, then in backward
        # the two fp32 gradients of the logits
        head_saved, head_weight_grad = 2 * a.vocab_size * FP32, 0
        forward_transient = tokens * a.vocab_size * (compute_bytes + FP32)
        backward_head = tokens * a.vocab_size * 2 * FP32
    saved = tokens * (sum(per_layer) + ends + head_saved) + head_weight_grad
    # backward: a checkpointed block is recomputed in full while it is differentiated, next to the gradients
    # of the largest activations of the block at hand (two MLP-hidden-sized tensors)
    # Eager: measured with the fused relu^2 / RoPE autograd functions (d4, C=128, full AC: 30.6 MB peak), a
    # recomputed block's backward adds about 12 C per token over the saved inputs, far below its 20 C of saved
    # tensors (non-reentrant checkpointing releases each recomputed tensor once backward has used it). The fused
    # CPU RMSNorm lowered that peak to 27.2 MB, where the end of forward (the head's fp32 chunks) is the peak,
    # so 12 C stays as the (conservative) backward figure.
    if compiled:
        recompute = (saved_per_token_per_layer(C, q_dim, kv_dim, True, compiled) * compute_bytes
                     if checkpointed else 0)
        working = 2 * 4 * C * compute_bytes
    else:
        recompute, working = (12 * C * compute_bytes if checkpointed else 0), 0
    backward_peak = saved + max(tokens * (recompute + working), backward_head)
    # the peak is the larger of "end of forward" and "inside backward"
    return max(saved + forward_transient, backward_peak)


def estimate_memory(plan, compute_bytes: int, shard_degree: int, ac_mode: str = "none", selective_every: int = 2,
                    fused_head: bool = True, compiled: bool = False) -> MemoryEstimate:
    p = plan.params
    total = p["total"]
    matrices = p["transformer_matrices"]
    adamw_params = total - matrices
    a = plan.model_args
    C, q_dim, kv_dim = a.n_embd, a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    # one value per row of a tall/square matrix, per column of a wide one: max(rows, cols) per matrix
    shapes = [(q_dim, C), (kv_dim, C), (kv_dim, C), (C, q_dim), (4 * C, C), (C, 4 * C)]
    per_layer = sum(max(shape) for shape in shapes)
    n_ve = sum(has_value_embedding(i, a.n_layer) for i in range(a.n_layer))
    ve_gates = n_ve * max(a.n_kv_head, VE_GATE_CHANNELS)  # ve_gate: (n_kv_head, 12)
    second_moment = a.n_layer * per_layer + ve_gates
    optimizer = FP32 * (2 * adamw_params + matrices + second_moment)
    return build_memory_estimate(
        plan, compute_bytes, shard_degree, ac_mode, selective_every, optimizer,
        lambda checkpointed: activation_bytes(plan, compute_bytes, checkpointed, fused_head, compiled), compiled)
