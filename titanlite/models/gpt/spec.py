"""The GPT's TrainSpec: the depth dial, counts, optimizer groups and plan lines of the reference recipe's model.

Optimizer groups (docs/recipe.md §3; B = batch LR scale sqrt(B / 2^19), W = width LR scale (C / 768)^-0.5):

| group          | optimizer | LR                                   | betas                          | wd     |
| lm_head        | AdamW     | unembedding_lr x B x W               | (adam_beta1, unembedding_beta2)| 0.01   |
| wte            | AdamW     | embedding_lr x B x W                 | (adam_beta1, embedding_beta2)  | 0.001  |
| value_embeds   | AdamW     | embedding_lr x B x W / 2             | (adam_beta1, embedding_beta2)  | 0.01   |
| resid_lambdas  | AdamW     | scalar_lr x B x 0.01                 | (0.8, 0.95)                    | 0.05   |
| x0_lambdas     | AdamW     | scalar_lr x B                        | (0.96, 0.95)                   | 0.0    |
| smear          | AdamW     | 0.2 (fixed: no batch or width scale) | (0.8, 0.95)                    | 0.0    |
| matrices       | Muon      | matrix_lr x B (x sqrt(max(1, rows/cols)) per shape) | -               | scaled |

unembedding_beta2 / embedding_beta2 = -1 fall back to adam_beta2: the seed's adam_beta1/adam_beta2 set the
embedding-type groups, the other groups keep the recipe's betas.
"""

from __future__ import annotations

from titanlite.errors import UserError
from titanlite.models.gpt.hf import to_hf
from titanlite.models.gpt.memory import estimate_memory
from titanlite.models.gpt.model import GPT, GPTArgs, count_flops_per_token, count_params, window_sizes
from titanlite.models.gpt.parallelize import parallelize_gpt
from titanlite.spec import (ADAMW, MUON, GroupSettings, LRScales, ModelCounts, TrainSpec, adam_betas,
                            width_and_heads)

SMEAR_LR = 0.2
EXPORT_FORMAT = "titanlite-gpt-v1"


def build_args(model_cfg, vocab_size: int) -> GPTArgs:
    if model_cfg.head_dim % 2:
        raise UserError(f"model.head_dim = {model_cfg.head_dim} must be even (rotary embeddings rotate pairs)")
    window_sizes(model_cfg.depth, model_cfg.max_seq_len, model_cfg.window_pattern)  # validates the pattern
    n_embd, n_head = width_and_heads(model_cfg.depth, model_cfg.aspect_ratio, model_cfg.head_dim)
    return GPTArgs(n_layer=model_cfg.depth, n_embd=n_embd, n_head=n_head, n_kv_head=n_head,
                   head_dim=model_cfg.head_dim, vocab_size=vocab_size, sequence_len=model_cfg.max_seq_len,
                   window_pattern=model_cfg.window_pattern.upper(), softcap=model_cfg.softcap,
                   attention_backend=model_cfg.attention_backend)


def counts(args: GPTArgs) -> ModelCounts:
    params = count_params(args)
    return ModelCounts(params=params, scaling_params=params["transformer_matrices"] + params["lm_head"],
                       flops_per_token=count_flops_per_token(args), width=args.n_embd)


def describe(args: GPTArgs) -> list[str]:
    sizes = window_sizes(args.n_layer, args.sequence_len, args.window_pattern)
    short = sorted({w for w in sizes if w < args.sequence_len})
    full = [i for i, w in enumerate(sizes) if w >= args.sequence_len]
    return [
        f"model             : depth {args.n_layer} | width {args.n_embd:,} | heads {args.n_head} x "
        f"{args.head_dim} (kv heads {args.n_kv_head}) | seq_len {args.sequence_len:,} | vocab {args.vocab_size:,} "
        f"(padded {args.padded_vocab:,})",
        f"attention windows : pattern {args.window_pattern}, short window "
        f"{', '.join(f'{w:,}' for w in short) or 'none'}, full layers {', '.join(map(str, full))}",
    ]


def optimizer_groups(optimizer_cfg, scales: LRScales) -> dict[str, GroupSettings]:
    cfg, b, w = optimizer_cfg, scales.batch, scales.width
    unembedding_betas, embedding_betas = adam_betas(cfg)
    return {
        "lm_head": GroupSettings(ADAMW, cfg.unembedding_lr * b * w, unembedding_betas, 0.01),
        "wte": GroupSettings(ADAMW, cfg.embedding_lr * b * w, embedding_betas, 0.001),
        "value_embeds": GroupSettings(ADAMW, cfg.embedding_lr * b * w * 0.5, embedding_betas, 0.01),
        "resid_lambdas": GroupSettings(ADAMW, cfg.scalar_lr * b * 0.01, (0.8, 0.95), 0.05),
        "x0_lambdas": GroupSettings(ADAMW, cfg.scalar_lr * b, (0.96, 0.95), 0.0),
        "smear": GroupSettings(ADAMW, SMEAR_LR, (0.8, 0.95), 0.0),
        "matrices": GroupSettings(MUON, cfg.matrix_lr * b, weight_decay=scales.muon_weight_decay),
    }


GPT_SPEC = TrainSpec(
    name="gpt", model_args_cls=GPTArgs, model_cls=GPT, build_args=build_args, counts=counts, describe=describe,
    optimizer_groups=optimizer_groups, parallelize=parallelize_gpt, window_pattern=lambda args: args.window_pattern,
    estimate_memory=estimate_memory, export_format=EXPORT_FORMAT, to_hf=to_hf)
