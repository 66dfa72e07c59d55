"""The Llama family's TrainSpec: its own depth dial, counts, optimizer groups and FSDP units.

Depth dial: width = depth x model.aspect_ratio (64 by default, so 64 x depth) rounded up to model.head_dim
(128: heads of 128), heads = width / 128, kv heads = heads / 4 (Llama 3's 4:1 grouping; fewer heads round to
a divisor), SwiGLU hidden = 8/3 x width rounded up to a multiple of 256. GPT-only model keys (window_pattern,
softcap) do not apply: every layer attends over the full context.

Optimizer groups (B = batch LR scale, W = width LR scale, as for the GPT): matrices Muon at matrix_lr x B with
the scaled weight decay; lm_head AdamW at unembedding_lr x B x W, wd 0.01; wte AdamW at embedding_lr x B x W,
wd 0.001; the RMSNorm gains AdamW at scalar_lr x B x 0.01 with no weight decay (multiplicative gains, like
the GPT's residual scalars, which train at that rate).
"""

from __future__ import annotations

import math

import torch

from titanlite.models.llama.hf import to_hf
from titanlite.models.llama.memory import estimate_memory
from titanlite.models.llama.model import Llama, LlamaArgs, count_flops_per_token, count_params
from titanlite.parallelize import parallelize
from titanlite.spec import (ADAMW, MUON, GroupSettings, LRScales, ModelCounts, TrainSpec, adam_betas,
                            width_and_heads)

KV_GROUP = 4
FFN_MULTIPLE = 256


def build_args(model_cfg, vocab_size: int) -> LlamaArgs:
    n_embd, n_head = width_and_heads(model_cfg.depth, model_cfg.aspect_ratio, model_cfg.head_dim)
    n_kv_head = max(1, n_head // KV_GROUP)
    while n_head % n_kv_head:
        n_kv_head -= 1
    ffn_dim = math.ceil(8 * n_embd / 3 / FFN_MULTIPLE) * FFN_MULTIPLE
    return LlamaArgs(n_layer=model_cfg.depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                     head_dim=model_cfg.head_dim, ffn_dim=ffn_dim, vocab_size=vocab_size,
                     sequence_len=model_cfg.max_seq_len, attention_backend=model_cfg.attention_backend)


def counts(args: LlamaArgs) -> ModelCounts:
    params = count_params(args)
    return ModelCounts(params=params, scaling_params=params["transformer_matrices"] + params["lm_head"],
                       flops_per_token=count_flops_per_token(args), width=args.n_embd)


def describe(args: LlamaArgs) -> list[str]:
    return [f"model             : llama | depth {args.n_layer} | width {args.n_embd:,} | heads {args.n_head} x "
            f"{args.head_dim} (kv heads {args.n_kv_head}) | ffn {args.ffn_dim:,} | seq_len {args.sequence_len:,} | "
            f"vocab {args.vocab_size:,} (padded {args.padded_vocab:,}) | RoPE theta {args.rope_theta:g}"]


def optimizer_groups(optimizer_cfg, scales: LRScales) -> dict[str, GroupSettings]:
    cfg, b, w = optimizer_cfg, scales.batch, scales.width
    unembedding_betas, embedding_betas = adam_betas(cfg)
    return {
        "lm_head": GroupSettings(ADAMW, cfg.unembedding_lr * b * w, unembedding_betas, 0.01),
        "wte": GroupSettings(ADAMW, cfg.embedding_lr * b * w, embedding_betas, 0.001),
        "norms": GroupSettings(ADAMW, cfg.scalar_lr * b * 0.01, (0.8, 0.95), 0.0),
        "matrices": GroupSettings(MUON, cfg.matrix_lr * b, weight_decay=scales.muon_weight_decay),
    }


def parallelize_llama(model, world, compile_cfg, float8_cfg, ac_cfg, param_dtype=torch.float32,
                      reduce_dtype=torch.float32):
    """The token embedding is an FSDP unit of its own, not gathered again for backward (its backward never reads
    the table); the head stays gathered from forward to backward."""
    return parallelize(model, world, compile_cfg, float8_cfg, ac_cfg, param_dtype, reduce_dtype,
                       fsdp_embedding_units=lambda m: (m.wte,), fsdp_gathered_units=lambda m: (m.lm_head,))


LLAMA_SPEC = TrainSpec(
    name="llama", model_args_cls=LlamaArgs, model_cls=Llama, build_args=build_args, counts=counts,
    describe=describe, optimizer_groups=optimizer_groups, parallelize=parallelize_llama,
    estimate_memory=estimate_memory, export_format="titanlite-llama-v1", to_hf=to_hf)
