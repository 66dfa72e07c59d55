"""A Llama-3-style decoder, in one file.

Pre-norm transformer: RMSNorm with a learnable weight, RoPE (base 500000, half-split), grouped-query attention
with full causal context in every layer, SwiGLU MLP, untied head, no softcap. None of GPT's extras (value
embeddings, smear, backout, QK-norm, per-layer scalars).

Same conventions as titanlite.models.gpt.model, which the trainer relies on: fp32 master weights with
activations and matmuls in `compute_dtype` (every linear casts its weight to the input's dtype, the embedding
casts its rows), the repeated layers in `model.blocks`, `init_weights()` after `to_empty(...)` using only
normal_/uniform_/constant fills (materialize redraws those per parameter name), analytic counts and FLOPs
from `LlamaArgs` that `num_params()` must agree with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from titanlite.attention import attention, attention_masks, select_attention_backend
from titanlite.generate import KVCache
from titanlite.models.gpt.ops import apply_rotary, fill_rope_tables

VOCAB_MULTIPLE = 64
# RoPE tables cover 10x the training context, as GPT's do: generation may run past T, and CORE scores few-shot
# prompts whole up to this length
ROPE_CONTEXT_MULTIPLE = 10
# per-token evaluation losses (val_bpb) form the head's logits this many elements at a time: 512 MiB of fp32
EVAL_CHUNK_ELEMENTS = 1 << 27
INIT_STD = 0.02  # every block linear; the two residual-stream outputs are further scaled by 1/sqrt(2 L)


@dataclass
class LlamaArgs:
    n_layer: int = 16
    n_embd: int = 2048
    n_head: int = 32
    n_kv_head: int = 8
    head_dim: int = 64
    ffn_dim: int = 8192
    vocab_size: int = 128256  # true vocab; tables use the padded size
    sequence_len: int = 2048
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    attention_backend: str = "sdpa"

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def count_params(args: LlamaArgs) -> dict[str, int]:
    """Parameters by group, computed without building the model."""
    C, L, V = args.n_embd, args.n_layer, args.padded_vocab
    q_dim, kv_dim = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    per_layer = C * q_dim + 2 * C * kv_dim + q_dim * C + 3 * C * args.ffn_dim  # q, k, v, proj; w1, w3, w2
    counts = {
        "wte": V * C,
        "lm_head": V * C,
        "transformer_matrices": L * per_layer,
        "norms": (2 * L + 1) * C,  # attn_norm, mlp_norm per layer; the final norm
    }
    counts["total"] = sum(counts.values())
    return counts


def count_flops_per_token(args: LlamaArgs) -> int:
    """6 x every matmul weight (blocks and head) + attention 12·H·D·T per layer (all layers see full context)."""
    p = count_params(args)
    attn = 12 * args.n_head * args.head_dim * args.sequence_len * args.n_layer
    return 6 * (p["transformer_matrices"] + p["lm_head"]) + attn


# ---------------------------------------------------------------------------------------------------------------

class Linear(nn.Linear):
    """Bias-free linear; the fp32 master weight is cast to the activation dtype so matmuls run in bf16."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, in fp32 (a bf16 mean of squares loses too much), returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE in Llama's (HF rotate_half) sense: (x1 c - x2 s, x2 c + x1 s) on (B, T, H, D).

    GPT's apply_rotary rotates the other way, (x1 c + x2 s, x2 c - x1 s), so it is handed -sin: the same fused
    kernel, with the sign checkpoints written by other Llama implementations expect.
    """
    return apply_rotary(x, cos, -sin)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        if args.n_head % args.n_kv_head:
            raise ValueError(f"n_kv_head = {args.n_kv_head} must divide n_head = {args.n_head}")
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        # full causal context: attention() treats any window >= T - 1 as plain causal, and forward never runs
        # past the RoPE table, so its length is such a window everywhere (training, prefill, decoding)
        self.window = ROPE_CONTEXT_MULTIPLE * args.sequence_len
        C = args.n_embd
        self.c_q = Linear(C, args.n_head * args.head_dim)
        self.c_k = Linear(C, args.n_kv_head * args.head_dim)
        self.c_v = Linear(C, args.n_kv_head * args.head_dim)
        self.c_proj = Linear(args.n_head * args.head_dim, C)
        self.backend = "sdpa"  # set by Llama.set_attention_backend

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        B, T, _ = x.shape
        q = rotary(self.c_q(x).reshape(B, T, self.n_head, self.head_dim), cos, sin)
        k = rotary(self.c_k(x).reshape(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = self.c_v(x).reshape(B, T, self.n_kv_head, self.head_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, self.window, backend=self.backend, block_mask=attn_mask)  # GQA inside
        return self.c_proj(y.reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, n_embd: int, ffn_dim: int):
        super().__init__()
        self.w1 = Linear(n_embd, ffn_dim)  # gate
        self.w3 = Linear(n_embd, ffn_dim)  # up
        self.w2 = Linear(ffn_dim, n_embd)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.n_embd, args.norm_eps)
        self.attn = Attention(args, layer_idx)
        self.mlp_norm = RMSNorm(args.n_embd, args.norm_eps)
        self.mlp = SwiGLU(args.n_embd, args.ffn_dim)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        C, V = args.n_embd, args.padded_vocab
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(args, i) for i in range(args.n_layer)])
        self.norm = RMSNorm(C, args.norm_eps)
        self.lm_head = Linear(C, V)
        # not saved in checkpoints (init_buffers refills them); forward slices them, so length costs nothing
        n_pos = ROPE_CONTEXT_MULTIPLE * args.sequence_len
        self.register_buffer("rope_cos", torch.zeros(1, n_pos, 1, args.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(1, n_pos, 1, args.head_dim // 2), persistent=False)
        self.compute_dtype = torch.float32
        self.attention_backend = args.attention_backend
        if self.attention_backend != "auto":
            self.set_attention_backend(self.attention_backend)

    @property
    def max_positions(self) -> int:
        """Longest sequence forward accepts: the RoPE table length (10 x sequence_len)."""
        return self.rope_cos.size(1)

    # ----- setup -----------------------------------------------------------------------------------------------
    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Activation/matmul dtype; parameters stay fp32."""
        self.compute_dtype = dtype

    def set_attention_backend(self, name: str) -> None:
        """A resolved backend name (see titanlite.attention.select_attention_backend)."""
        self.attention_backend = name
        for block in self.blocks:
            block.attn.backend = name

    @torch.no_grad()
    def init_buffers(self) -> None:
        fill_rope_tables(self.rope_cos, self.rope_sin, self.args.rope_theta)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Llama-style init (torchtitan's llama3 scheme with plain normals); call after `to_empty(device=...)`.

        wte ~ N(0, 1): the first RMSNorm rescales it anyway. Block linears ~ N(0, 0.02); the outputs into the
        residual stream (c_proj, w2) ~ N(0, 0.02 / sqrt(2 L)), so the 2 L summed updates keep the stream's
        scale independent of depth. lm_head ~ N(0, 1 / sqrt(C)): unit-rms normed inputs give O(1) logits.
        Norm weights 1. torchtitan truncates its normals at 3 std; materialize only redraws normal_/uniform_,
        so these are untruncated (a 3-sigma tail is 0.3% of the draws either way).
        """
        C, L = self.args.n_embd, self.args.n_layer
        out_std = INIT_STD / math.sqrt(2 * L)
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for lin in (attn.c_q, attn.c_k, attn.c_v, mlp.w1, mlp.w3):
                nn.init.normal_(lin.weight, mean=0.0, std=INIT_STD)
            for lin in (attn.c_proj, mlp.w2):
                nn.init.normal_(lin.weight, mean=0.0, std=out_std)
            nn.init.ones_(block.attn_norm.weight)
            nn.init.ones_(block.mlp_norm.weight)
        nn.init.ones_(self.norm.weight)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=C ** -0.5)
        self.init_buffers()

    # ----- forward ---------------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache=None) -> torch.Tensor:
        """targets None -> fp32 logits (B, T, vocab); else the cross-entropy (ignore_index -1)."""
        if self.attention_backend == "auto":  # no short windows, so "L" (flex is never needed)
            self.set_attention_backend(select_attention_backend("auto", idx.device.type, self.compute_dtype,
                                                                "L")[0])
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.max_positions:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the RoPE table ({self.max_positions})")
        dtype = self.compute_dtype
        cos = self.rope_cos[:, pos:pos + T].to(dtype)
        sin = self.rope_sin[:, pos:pos + T].to(dtype)
        # flex block mask: built (once per shape, cached) here, outside the compiled blocks, and passed in
        window = ROPE_CONTEXT_MULTIPLE * self.args.sequence_len
        masks = attention_masks(self.attention_backend, T, [window], idx.device) if kv_cache is None else None
        mask = masks[window] if masks else None

        x = self.wte(idx).to(dtype)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, mask)
        x = self.norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        if targets is not None and loss_reduction == "none" and not torch.is_grad_enabled():
            return self._token_losses(x, targets)
        logits = self.lm_head(x)[..., :self.args.vocab_size].float()  # crop the vocab padding
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.reshape(targets.shape) if loss_reduction == "none" else loss

    def _token_losses(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (evaluation, no gradient) in row chunks: never more than a chunk's fp32 logits
        (the whole batch's would be tokens x vocab x 4 bytes, several times over)."""
        x2, t2 = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        rows = max(1, EVAL_CHUNK_ELEMENTS // self.args.padded_vocab)
        losses = [F.cross_entropy(self.lm_head(x2[s:s + rows])[..., :self.args.vocab_size].float(), t2[s:s + rows],
                                  ignore_index=-1, reduction="none") for s in range(0, x2.size(0), rows)]
        return torch.cat(losses).reshape(targets.shape)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layer, batch_size, max_len, a.n_kv_head, a.head_dim, self.wte.weight.device,
                       self.compute_dtype)

    # ----- bookkeeping -----------------------------------------------------------------------------------------
    def _norms(self) -> list[nn.Parameter]:
        return [w for b in self.blocks for w in (b.attn_norm.weight, b.mlp_norm.weight)] + [self.norm.weight]

    def _matrices(self) -> list[nn.Parameter]:
        """Every block weight but the norms (by identity: float8 may have swapped the Linear classes)."""
        norm_ids = {id(p) for p in self._norms()}
        return [p for p in self.blocks.parameters() if id(p) not in norm_ids]

    def num_params(self) -> dict[str, int]:
        """Real parameter counts by group (global sizes, also when sharded)."""
        counts = {
            "wte": self.wte.weight.numel(),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self._matrices()),
            "norms": sum(p.numel() for p in self._norms()),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is in no group"
        return counts

    def scaling_params(self) -> int:
        """N in the tokens:params ratio: transformer matrices + lm_head (no embeddings, no norms)."""
        counts = self.num_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    def flops_per_token(self) -> int:
        return count_flops_per_token(self.args)

    def optimizer_param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"lm_head": [self.lm_head.weight], "wte": [self.wte.weight], "norms": self._norms(),
                "matrices": self._matrices()}
