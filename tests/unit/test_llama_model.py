"""The Llama-3-style model against a textbook reference written out here, plus counts, KV cache, init, bf16."""

import math

import pytest
import torch

from titanlite.generate import KVCache
from titanlite.models.llama.model import Llama, LlamaArgs, count_flops_per_token, count_params

# GQA (4 query heads on 2 kv heads) and a vocab that is not a multiple of 64, so the padding crop is exercised
TINY = LlamaArgs(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, ffn_dim=48, vocab_size=100,
                 sequence_len=16)


def build(args: LlamaArgs = TINY, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Llama(args)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def perturbed(args: LlamaArgs = TINY) -> Llama:
    """Norm weights away from 1 so the reference check sees them act, and q/k scaled up: at init the attention
    is nearly uniform, so a wrong RoPE or mask would hardly move the logits."""
    model = build(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "c_q" in name or "c_k" in name:
                p.mul_(10.0)
    return model


def batch(args: LlamaArgs, B: int = 2, T: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = T or args.sequence_len
    idx = torch.randint(0, args.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, args.vocab_size, (B, T), generator=g)
    targets[0, :3] = -1  # ignored positions
    return idx, targets


# ---- the reference: every step spelled out, sharing nothing with the module but its weight tensors ---------

def ref_rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def ref_rope(x, theta):
    """Half-split pairs (x[i], x[i + D/2]) as complex numbers, rotated by e^{i·pos·theta^(-2i/D)}."""
    B, T, H, D = x.shape
    freqs = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]          # (T, D/2)
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double())            # (B, T, H, D/2)
    z = z * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def ref_forward(model: Llama, idx, targets=None):
    a = model.args
    B, T = idx.shape
    x = model.wte.weight[idx]
    for blk in model.blocks:
        at = blk.attn
        h = ref_rmsnorm(x, blk.attn_norm.weight, a.norm_eps)
        q = ref_rope((h @ at.c_q.weight.T).view(B, T, a.n_head, a.head_dim), a.rope_theta)
        k = ref_rope((h @ at.c_k.weight.T).view(B, T, a.n_kv_head, a.head_dim), a.rope_theta)
        v = (h @ at.c_v.weight.T).view(B, T, a.n_kv_head, a.head_dim)
        group = a.n_head // a.n_kv_head  # query head j reads kv head j // group
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(a.head_dim)
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        y = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(B, T, -1)
        x = x + y @ at.c_proj.weight.T
        h = ref_rmsnorm(x, blk.mlp_norm.weight, a.norm_eps)
        gate, up = h @ blk.mlp.w1.weight.T, h @ blk.mlp.w3.weight.T
        x = x + (gate * torch.sigmoid(gate) * up) @ blk.mlp.w2.weight.T
    x = ref_rmsnorm(x, model.norm.weight, a.norm_eps)
    logits = (x @ model.lm_head.weight.T)[..., :a.vocab_size]
    if targets is None:
        return logits
    logp = torch.log_softmax(logits, dim=-1).reshape(-1, a.vocab_size)
    t = targets.reshape(-1)
    keep = t >= 0
    return -logp[keep].gather(1, t[keep, None]).mean()


# ---- (a) reference match ----------------------------------------------------------------------------------

def test_matches_reference_logits_loss_and_grads():
    model = perturbed()
    idx, targets = batch(TINY)
    logits = model(idx)
    assert logits.shape == (2, TINY.sequence_len, TINY.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_forward(model, idx), atol=1e-5, rtol=1e-5)

    params = [model.wte.weight, model.blocks[0].attn.c_q.weight, model.blocks[0].attn.c_k.weight,
              model.blocks[1].mlp.w2.weight, model.blocks[1].attn_norm.weight, model.norm.weight,
              model.lm_head.weight]
    loss, ref_loss = model(idx, targets), ref_forward(model, idx, targets)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, ref_g in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-4)


def test_loss_reductions():
    model = build()
    idx, targets = batch(TINY)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == targets.shape
    assert (per_token[0, :3] == 0).all()
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_token.sum())
    torch.testing.assert_close(model(idx, targets), per_token.sum() / (targets >= 0).sum())


# ---- (b) counts -------------------------------------------------------------------------------------------

def shape_counts(model: Llama) -> dict[str, int]:
    counts = {"wte": 0, "lm_head": 0, "transformer_matrices": 0, "norms": 0}
    for name, p in model.named_parameters():
        group = ("wte" if name.startswith("wte.") else "lm_head" if name.startswith("lm_head.")
                 else "norms" if "norm" in name else "transformer_matrices")
        counts[group] += math.prod(p.shape)
    counts["total"] = sum(counts.values())
    return counts


LLAMA3_8B = LlamaArgs(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, head_dim=128, ffn_dim=14336,
                      vocab_size=128256, sequence_len=8192)


@pytest.mark.parametrize("args", [TINY, LLAMA3_8B], ids=["tiny", "llama3-8b"])
def test_counts_match_module_shapes(args):
    with torch.device("meta"):
        model = Llama(args)
    assert count_params(args) == shape_counts(model) == model.num_params()
    assert model.num_params()["total"] == sum(p.numel() for p in model.parameters())
    groups = model.optimizer_param_groups()
    assert sorted(id(p) for ps in groups.values() for p in ps) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 1 for p in groups["norms"]) and all(p.ndim == 2 for p in groups["matrices"])


def test_llama3_8b_total_and_flops():
    assert count_params(LLAMA3_8B)["total"] == 8_030_261_248  # the published Llama-3-8B parameter count
    p = count_params(TINY)
    attn = 12 * 4 * 8 * 16 * 2
    assert count_flops_per_token(TINY) == 6 * (p["transformer_matrices"] + p["lm_head"]) + attn
    assert TINY.padded_vocab == 128 and p["lm_head"] == 128 * 32


# ---- (c) KV cache -----------------------------------------------------------------------------------------

def test_kv_cache_decoding_matches_full_forward():
    model = perturbed()
    idx, _ = batch(TINY, T=12)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2, 12)
        assert isinstance(cache, KVCache)
        steps = [model(idx[:, :4], kv_cache=cache)]  # a prefill, then one token at a time
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(4, 12)]
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_positions_past_rope_table_raise():
    model = build()
    assert model.max_positions == 10 * TINY.sequence_len
    cache = model.new_kv_cache(1, model.max_positions + 1)
    cache.advance(model.max_positions)
    with pytest.raises(ValueError, match="RoPE table"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


# ---- (d) it learns ----------------------------------------------------------------------------------------

def test_tiny_model_memorises_a_batch():
    model = build()
    idx, targets = batch(TINY, B=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---- (e) init ---------------------------------------------------------------------------------------------

def test_init_is_seeded_finite_with_unit_norms():
    a, b = build(seed=3), build(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name
        if "norm" in name:
            assert (p == 1).all(), name
    std = lambda p: p.std().item()  # noqa: E731
    assert 0.9 < std(a.wte.weight) < 1.1
    assert 0.015 < std(a.blocks[0].attn.c_q.weight) < 0.025
    assert std(a.blocks[0].mlp.w2.weight) < std(a.blocks[0].mlp.w1.weight) / 1.5  # 1/sqrt(2 L) = 0.5
    assert torch.allclose(a.rope_cos[0, 0], torch.ones(TINY.head_dim // 2))


# ---- (f) bf16 compute -------------------------------------------------------------------------------------

def test_bf16_compute_is_close_to_fp32():
    model = build()
    idx, targets = batch(TINY)
    with torch.no_grad():
        ref, ref_loss = model(idx), model(idx, targets)
        model.set_compute_dtype(torch.bfloat16)
        out, loss = model(idx), model(idx, targets)
    assert out.dtype == torch.float32 and model.wte.weight.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert abs(loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()
