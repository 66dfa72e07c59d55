"""The reference recipe's GPT (docs/recipe.md §1), in one file.

Pre-norm transformer with weight-free RMSNorm, RoPE (base 100000, half-split), QK-norm scaled by 1.2, ReLU² MLP,
value embeddings on alternating layers (gated), per-layer residual/x0 scalars, smear (previous-token mixing),
backout (subtract the mid-depth stream), untied head, logit softcap, per-layer sliding windows.

Master weights are fp32; activations and matmuls run in `compute_dtype` (set with `set_compute_dtype`): every
linear casts its weight to the input's dtype and embeddings cast their rows, so bf16 needs no autocast.
The parameter counts and FLOPs are analytic functions of `GPTArgs` (used by the planner without any weights);
the module's own `num_params()` counts real parameters and must agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from titanlite.attention import attention, attention_masks, select_attention_backend
from titanlite.errors import UserError
from titanlite.generate import KVCache
from titanlite.models.gpt.mix_ops import gated_add, scaled_sum, smear
from titanlite.models.gpt.ops import (embedding, fill_rope_tables, relu_squared, rms_norm, rotary_norm,
                                     softcapped_cross_entropy)

ROPE_BASE = 100_000
QK_SCALE = 1.2          # q and k are multiplied by this after QK-norm (logits x 1.44)
VE_GATE_CHANNELS = 12   # the value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24     # the smear gate reads the first 24 channels of the normed embedding
VOCAB_MULTIPLE = 64
# RoPE tables cover 10x the training context, as the reference's do: generation may run past T, and CORE
# scores few-shot prompts whole up to this length (longer ones are the only ones it crops)
ROPE_CONTEXT_MULTIPLE = 10


@dataclass
class GPTArgs:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 6
    n_kv_head: int = 6
    head_dim: int = 128
    vocab_size: int = 32768  # true vocab; tables use the padded size
    sequence_len: int = 2048
    window_pattern: str = "SSSL"
    softcap: float = 15.0
    attention_backend: str = "auto"

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def window_sizes(n_layer: int, sequence_len: int, window_pattern: str) -> list[int]:
    """Left window per layer: L = sequence_len, S = quarter context rounded up to 128; last layer always L."""
    pattern = window_pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise UserError(f"model.window_pattern = {window_pattern!r} must be a non-empty string of S and L "
                        "(e.g. SSSL, or L for full context everywhere)")
    short = math.ceil(sequence_len / 4 / 128) * 128
    sizes = [sequence_len if pattern[i % len(pattern)] == "L" else short for i in range(n_layer)]
    sizes[-1] = sequence_len
    return sizes


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def count_params(args: GPTArgs) -> dict[str, int]:
    """Parameters by group, computed without building the model (docs/recipe.md §2.1)."""
    C, L, V = args.n_embd, args.n_layer, args.padded_vocab
    q_dim, kv_dim = args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    n_ve = sum(has_value_embedding(i, L) for i in range(L))
    per_layer = C * q_dim + 2 * C * kv_dim + q_dim * C + 2 * C * 4 * C  # q, k, v, proj; fc, proj
    counts = {
        "wte": V * C,
        "value_embeds": n_ve * V * kv_dim,
        "lm_head": V * C,
        "transformer_matrices": L * per_layer + n_ve * VE_GATE_CHANNELS * args.n_kv_head,
        "scalars": 2 * L + SMEAR_CHANNELS + 2,  # resid, x0 per layer; smear gate, smear and backout lambdas
    }
    counts["total"] = sum(counts.values())
    return counts


def count_flops_per_token(args: GPTArgs) -> int:
    """6 x every matmul weight (blocks, head, smear gate) + attention 12·H·D·min(window, T) per layer (§2.2).

    Analytic on purpose: it does not care which Linear class a layer is (float8 layers count too).
    """
    p = count_params(args)
    matmul_weights = p["transformer_matrices"] + p["lm_head"] + SMEAR_CHANNELS
    T = args.sequence_len
    attn = sum(12 * args.n_head * args.head_dim * min(w, T)
               for w in window_sizes(args.n_layer, T, args.window_pattern))
    return 6 * matmul_weights + attn


# ---------------------------------------------------------------------------------------------------------------

def norm(x: torch.Tensor, scale: float = 1.0, out_dtype: torch.dtype | None = None, copies: int = 1,
         prefix: int = 0):
    """scale * F.rms_norm(x, (x.size(-1),)) (no learnable weight, PyTorch's default eps), in out_dtype; with
    copies > 1 or a prefix, a tuple of aliases whose gradients are summed in fp32 (ops.rms_norm)."""
    return rms_norm(x, scale, out_dtype, copies, prefix)


class Linear(nn.Linear):
    """Bias-free linear; the fp32 master weight is cast to the activation dtype so matmuls run in bf16."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Embedding(nn.Embedding):
    """Token / value-embedding table whose backward sums row gradients in eager's fixed order, also inside a
    compiled graph (ops.embedding), so a compiled run resumes bitwise. Called as a module: FSDP gathers it."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return embedding(self.weight, idx)


class Unembedding(Linear):
    """lm_head: plain logits when called with x alone; with targets, the fused softcap + CE above.

    The loss goes through the module call (not a free function on its weight) so FSDP's pre-forward hook has
    gathered the weight and its post-backward hook sees the gradient. Both forwards only use `self.weight` and
    `self.out_features`, so titanlite.float8 runs them on the torchao Float8Linear that replaces this head.
    """

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, softcap: float = 15.0,
                vocab_size: int | None = None, reduction: str = "mean") -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight.to(x.dtype))
        return softcapped_cross_entropy(x, self.weight.to(x.dtype), targets, softcap,
                                        vocab_size or self.out_features, reduction)

    def float8_forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, softcap: float = 15.0,
                       vocab_size: int | None = None, reduction: str = "mean") -> torch.Tensor:
        """The forward of this head once float8 training made it a torchao Float8Linear (`self` is that module).

        Logits go through torchao's float8 matmul. The loss keeps the fused head (the unfused one materialises
        three fp32 (tokens x vocab) logit copies: ~12 GiB at d26, batch 16) on x and the weight quantised exactly
        as that matmul quantises them and dequantised (titanlite.float8.float8_dequantised), so the forward is
        the float8 forward up to accumulation order. Its backward matmuls run in the compute dtype on those
        operands with the unquantised logit gradient, where torchao's would also quantise that gradient: the
        head (~6% of the matmul FLOPs at d26) keeps bf16 GEMM speed, which costs far less than the logits would.
        """
        if targets is None:
            return type(self).forward(self, x)
        from titanlite.float8 import float8_dequantised

        x_q, weight_q = float8_dequantised(self, x)
        return softcapped_cross_entropy(x_q, weight_q, targets, softcap, vocab_size or self.out_features, reduction)


class CausalSelfAttention(nn.Module):
    def __init__(self, args: GPTArgs, layer_idx: int, window: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, window
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        C = args.n_embd
        self.c_q = Linear(C, args.n_head * args.head_dim)
        self.c_k = Linear(C, args.n_kv_head * args.head_dim)
        self.c_v = Linear(C, args.n_kv_head * args.head_dim)
        self.c_proj = Linear(args.n_head * args.head_dim, C)
        self.has_ve = has_value_embedding(layer_idx, args.n_layer)
        self.ve_gate = Linear(VE_GATE_CHANNELS, args.n_kv_head) if self.has_ve else None
        # channels of the input the value-embedding gate reads (Block norms the input into q, k, v copies + these)
        self.gate_channels = VE_GATE_CHANNELS if self.has_ve else 0
        self.backend = "sdpa"  # set by GPT.set_attention_backend

    def forward(self, x, ve, cos, sin, kv_cache=None, attn_mask=None):
        """x: the normed input, or the tuple (x, x, x[, x[..., :gate_channels]]) of aliases that ops.rms_norm
        returns, one per consumer (q, k, v, gate), whose gradients the norm then sums in fp32, not autograd in bf16.
        """
        if not isinstance(x, tuple):
            x = (x, x, x) + ((x[..., :self.gate_channels],) if self.gate_channels else ())
        x_q, x_k, x_v, *gate_in = x
        B, T, _ = x_q.shape
        q = self.c_q(x_q).reshape(B, T, self.n_head, self.head_dim)
        k = self.c_k(x_k).reshape(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x_v).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: one gate in (0, 3) per kv-head and position (fp32 gate gradients)
            v = gated_add(v, ve.reshape(B, T, self.n_kv_head, self.head_dim), gate_in[0], self.ve_gate.weight, 3.0)
        q, k = rotary_norm(q, cos, sin, QK_SCALE), rotary_norm(k, cos, sin, QK_SCALE)  # RoPE, then QK-norm
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, self.window, backend=self.backend, block_mask=attn_mask)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd)
        self.c_proj = Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    # FSDP leaves this block's inputs alone and sets input_dtype (titanlite.parallelize.apply_fsdp): its own cast
    # of every floating-point argument would also round the fp32 RoPE tables to bf16
    casts_own_inputs = True

    def __init__(self, args: GPTArgs, layer_idx: int, window: int):
        super().__init__()
        self.attn = CausalSelfAttention(args, layer_idx, window)
        self.mlp = MLP(args.n_embd)
        self.compute_dtype = torch.float32  # set by GPT.set_compute_dtype
        self.input_dtype: torch.dtype | None = None  # under FSDP: its param dtype, the stream's dtype in here

    def forward(self, x, ve, cos, sin, kv_cache=None, attn_mask=None):
        if self.input_dtype is not None:  # what FSDP's input cast did, minus the tables (bf16 stream and ve rows
            x = x.to(self.input_dtype)    # in a sharded block: their saved copies are the activation budget)
            ve = ve.to(self.input_dtype) if ve is not None else None
        # x is the residual stream (fp32 in a bf16 run, see GPT.forward); the branches run in the compute dtype
        attn_in = norm(x, out_dtype=self.compute_dtype, copies=3, prefix=self.attn.gate_channels)
        x = x + self.attn(attn_in, ve, cos, sin, kv_cache, attn_mask)
        return x + self.mlp(norm(x, out_dtype=self.compute_dtype))


class GPT(nn.Module):
    def __init__(self, args: GPTArgs):
        super().__init__()
        self.args = args
        L, C, V = args.n_layer, args.n_embd, args.padded_vocab
        kv_dim = args.n_kv_head * args.head_dim
        self.windows = window_sizes(L, args.sequence_len, args.window_pattern)
        self.wte = Embedding(V, C)
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, kv_dim)
                                           for i in range(L) if has_value_embedding(i, L)})
        self.blocks = nn.ModuleList([Block(args, i, w) for i, w in enumerate(self.windows)])
        self.lm_head = Unembedding(C, V)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        # RoPE tables for 10x the context (generation and CORE prompts may run past T); not saved in checkpoints.
        # Forward slices them, so their length costs training nothing.
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

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        a = self.args
        return KVCache(a.n_layer, batch_size, max_len, a.n_kv_head, a.head_dim, self.wte.weight.device,
                       self.compute_dtype)

    # ----- setup -----------------------------------------------------------------------------------------------
    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Activation/matmul dtype; parameters stay fp32."""
        self.compute_dtype = dtype
        for block in self.blocks:
            block.compute_dtype = dtype

    def set_attention_backend(self, name: str) -> None:
        """A resolved backend name (see titanlite.attention.select_attention_backend)."""
        self.attention_backend = name
        for block in self.blocks:
            block.attn.backend = name

    @torch.no_grad()
    def init_buffers(self) -> None:
        fill_rope_tables(self.rope_cos, self.rope_sin, ROPE_BASE)

    @torch.no_grad()
    def init_weights(self) -> None:
        """All real initialisation (docs/recipe.md §1.4); call after `to_empty(device=...)`."""
        C, L = self.args.n_embd, self.args.n_layer
        s = math.sqrt(3) / math.sqrt(C)  # uniform bound with std 1/sqrt(C)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            for lin in (attn.c_q, attn.c_k, attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(attn.c_proj.weight)
            nn.init.uniform_(mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(mlp.c_proj.weight)
            if attn.ve_gate is not None:
                nn.init.uniform_(attn.ve_gate.weight, 0.0, 0.02)
        frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        _fill(self.resid_lambdas, 1.15 - 0.10 * frac)
        _fill(self.x0_lambdas, 0.20 - 0.15 * frac)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -s, s)
        self.init_buffers()

    # ----- forward ---------------------------------------------------------------------------------------------
    def _smear(self, x: torch.Tensor, kv_cache) -> torch.Tensor:
        """x_t += smear_lambda·sigmoid(w·x_t[:24])·x_{t-1}, on pre-smear vectors; the first position is untouched."""
        if kv_cache is None or kv_cache.pos == 0:
            out = smear(x, self.smear_lambda, self.smear_gate.weight)
        else:  # decoding: the previous token's embedding comes from the cache
            lam = self.smear_lambda.to(x.dtype)
            prev = torch.cat([kv_cache.prev_embed, x[:, :-1]], dim=1)
            out = x + lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS])) * prev
        if kv_cache is not None:
            kv_cache.prev_embed = x[:, -1:]
        return out

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache=None) -> torch.Tensor:
        """targets None -> fp32 softcapped logits (B, T, vocab); else the cross-entropy (ignore_index -1)."""
        if self.attention_backend == "auto":
            dt = self.compute_dtype
            self.set_attention_backend(select_attention_backend("auto", idx.device.type, dt,
                                                                self.args.window_pattern)[0])
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.rope_cos.size(1):
            raise ValueError(f"sequence of {pos + T} tokens exceeds the RoPE table ({self.rope_cos.size(1)})")
        dtype = self.compute_dtype
        # RoPE tables, the residual stream and x0 stay fp32 (or the compute dtype if wider); see below
        stream = torch.promote_types(dtype, torch.float32)
        # rounding the tables to bf16 would shift every angle by up to 2^-9
        cos = self.rope_cos[:, pos:pos + T].to(stream)
        sin = self.rope_sin[:, pos:pos + T].to(stream)

        # The residual stream and x0 (the normed, smeared embedding) stay in fp32 (or the compute dtype if wider):
        # the gradients of the per-layer scalars, the smear and the embeddings are sums over every token and
        # channel of (stream gradient) x (stream), which in bf16 are mostly the rounding of the stream's gradient
        # (bf16 gradients of x0_lambdas measured 37 % off at d4). Every branch (attention, MLP, head) still reads
        # a bf16 norm of the stream and runs its matmuls in `dtype`; the stream costs fp32 adds and norm reads, and
        # its saved copies are fp32 (the mixes' and, on CPU, the norms' inputs: rounded, they would leave the
        # resid_lambdas gradient at initialisation 1000x noisier than the compiled graph's). Under FSDP each block
        # casts the stream to its param dtype (Block.input_dtype), so there the stream is bf16 inside each block
        # and fp32 between them.
        x = self._smear(norm(self.wte(idx).to(stream)), kv_cache)
        x0 = x
        backout_at = self.args.n_layer // 2
        # flex block masks: built (once per shape, cached) here, outside the compiled blocks, and passed in
        masks = attention_masks(self.attention_backend, T, self.windows, idx.device) if kv_cache is None else None
        x_backout = x
        for i, block in enumerate(self.blocks):
            x = scaled_sum(x, self.resid_lambdas[i], x0, self.x0_lambdas[i], out_dtype=stream)
            key = str(i)
            ve = self.value_embeds[key](idx) if key in self.value_embeds else None  # gated_add upcasts it
            x = block(x, ve, cos, sin, kv_cache, masks[self.windows[i]] if masks else None)
            if i == backout_at:
                x_backout = x
        x = norm(scaled_sum(x, self._one(x), x_backout, -self.backout_lambda), out_dtype=dtype)
        if kv_cache is not None:
            kv_cache.advance(T)

        if targets is None:
            return self.logits(x)
        return self.loss(x, targets, loss_reduction)

    @staticmethod
    def _one(x: torch.Tensor) -> torch.Tensor:
        return torch.ones((), dtype=torch.float32, device=x.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Head on the final normed stream: crop the vocab padding, fp32, softcap."""
        logits = self.lm_head(x)[..., :self.args.vocab_size].float()
        c = self.args.softcap
        return c * torch.tanh(logits / c)

    def loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        head_class = getattr(self.lm_head, "float8_origin", type(self.lm_head))  # its class before a float8 swap
        # the fused head: training's sums, and evaluation's per-token losses (val_bpb) chunk by chunk
        fused = reduction in ("sum", "mean") or (reduction == "none" and not torch.is_grad_enabled())
        if fused and issubclass(head_class, Unembedding):
            return self.lm_head(x, targets=targets, softcap=self.args.softcap, vocab_size=self.args.vocab_size,
                                reduction=reduction)
        logits = self.logits(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.reshape(targets.shape) if reduction == "none" else loss

    # ----- bookkeeping -----------------------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Real parameter counts by group (global sizes, also when sharded)."""
        counts = {
            "wte": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.blocks.parameters()),
            "scalars": sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                               self.smear_lambda, self.backout_lambda)),
        }
        counts["total"] = sum(counts.values())
        assert counts["total"] == sum(p.numel() for p in self.parameters()), "a parameter is in no group"
        return counts

    def scaling_params(self) -> int:
        """N in the tokens:params ratio: transformer matrices + lm_head (no embeddings, no scalars)."""
        counts = self.num_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    def flops_per_token(self) -> int:
        return count_flops_per_token(self.args)

    def optimizer_param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "lm_head": [self.lm_head.weight],
            "wte": [self.wte.weight],
            "value_embeds": list(self.value_embeds.parameters()),
            "resid_lambdas": [self.resid_lambdas],
            "x0_lambdas": [self.x0_lambdas],
            "smear": [self.smear_gate.weight, self.smear_lambda, self.backout_lambda],
            "matrices": list(self.blocks.parameters()),
        }


def _fill(param: torch.Tensor, values: torch.Tensor) -> None:
    """Copy full values into a parameter that may be a sharded DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        values = distribute_tensor(values.to(param.device), param.device_mesh, param.placements)
    param.copy_(values.to(param.device))
