"""The Llama family's memory per GPU for the planner (python -m titanlite.plan), counted tensor by tensor.

Same layout as the GPT's estimate (models/gpt/memory.py): fp32 parameters, gradients and optimizer states sharded
over the FSDP shard degree (AdamW's two moments for embedding, head and norms; Muon's momentum plus one NorMuon
value per row or column of each block matrix), compute-dtype weight copies in flight, and the activations of one
micro-step. Counted with saved_tensors_hooks on a d20 block under fake tensors (bf16, 2,048 tokens) and held
against the simulated step (titanlite.simulate). Eager only: compile is not measured for this family.
Not counted: the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

from titanlite.spec import MemoryEstimate, build_memory_estimate

FP32 = 4
INDEX_BYTES = 8  # int64 token ids, kept by the embedding's backward


def saved_bytes_per_token_per_layer(a, compute_bytes: int) -> int:
    """Bytes one block keeps for backward, per token.

    Each RMSNorm computes in fp32 and keeps its fp32 input, its fp32 normalised output (the weight multiply's)
    and the fp32 rstd; the linears keep their compute-dtype input (q/k/v share one); attention keeps q, k, v,
    its output (the projection's input, a view) and the fp32 log-sum-exp per head; RoPE's fused kernel keeps the
    cos/sin tables it is handed (per call, q and k); SwiGLU keeps w1's and w3's outputs, silu's output and the
    product (w2's input).
    """
    C, F = a.n_embd, a.ffn_dim
    q_dim, kv_dim = a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    norms = 2 * (2 * C * FP32 + FP32)
    linear_inputs = 2 * C * compute_bytes  # attention's and the MLP's normed inputs
    attention = (2 * q_dim + 2 * kv_dim) * compute_bytes + a.n_head * FP32
    rope_tables = 2 * (a.head_dim + a.head_dim // 2) * compute_bytes
    mlp = 4 * F * compute_bytes
    return norms + linear_inputs + attention + rope_tables + mlp


def activation_bytes(plan, compute_bytes: int, checkpointed: set[int]) -> int:
    a = plan.model_args
    C, L, V = a.n_embd, a.n_layer, a.vocab_size
    tokens = plan.device_batch_size * plan.seq_len
    full = saved_bytes_per_token_per_layer(a, compute_bytes)
    # a checkpointed block keeps only its input
    layers = sum(C * compute_bytes if i in checkpointed else full for i in range(L))
    # ends: the token ids, the final norm (fp32 input, output, rstd) and the head's compute-dtype input; the
    # cross-entropy keeps its fp32 log-softmax (tokens x vocab)
    ends = INDEX_BYTES + 2 * C * FP32 + FP32 + C * compute_bytes
    saved = tokens * (layers + ends + V * FP32)
    # the head's transients next to everything saved: at the end of forward the fp32 logits (4 per logit); at the
    # start of backward the log-softmax's and the logits' fp32 gradients (8 per logit); a checkpointed block's
    # recomputation holds one block's full set at a time, after the head's gradients are gone
    head = tokens * V * 2 * FP32
    recompute = tokens * full if checkpointed else 0
    return saved + max(head, recompute)


def estimate_memory(plan, compute_bytes: int, shard_degree: int, ac_mode: str = "none", selective_every: int = 2,
                    fused_head: bool = True, compiled: bool = False) -> MemoryEstimate:
    p, a = plan.params, plan.model_args
    total, matrices = p["total"], p["transformer_matrices"]
    C, q_dim, kv_dim = a.n_embd, a.n_head * a.head_dim, a.n_kv_head * a.head_dim
    # NorMuon: one value per row of a tall/square matrix, per column of a wide one
    shapes = [(q_dim, C), (kv_dim, C), (kv_dim, C), (C, q_dim), (a.ffn_dim, C), (a.ffn_dim, C), (C, a.ffn_dim)]
    second_moment = a.n_layer * sum(max(shape) for shape in shapes)
    optimizer = FP32 * (2 * (total - matrices) + matrices + second_moment)
    return build_memory_estimate(plan, compute_bytes, shard_degree, ac_mode, selective_every, optimizer,
                                 lambda checkpointed: activation_bytes(plan, compute_bytes, checkpointed))
