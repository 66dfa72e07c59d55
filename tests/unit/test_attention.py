"""Every attention backend available here agrees with a naive float64 reference; start-up lines and errors."""

import math

import pytest
import torch

from titanlite.attention import attention, backend_available, select_attention_backend, window_mask
from titanlite.errors import UserError



def naive(q, k, v, window):
    """softmax(q k^T / sqrt(D)) v in float64 with keys j: i - window <= j <= i (queries = last Tq positions)."""
    q, k, v = (x.double() for x in (q, k, v))
    t_q, t_k, h = q.size(1), k.size(1), q.size(2)
    rep = h // k.size(2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    out = torch.zeros_like(q)
    for i in range(t_q):
        pos = t_k - t_q + i
        lo = max(0, pos - window)
        w = scores[:, :, i, lo:pos + 1].softmax(-1)
        out[:, i] = torch.einsum("bhk,bkhd->bhd", w, v[:, lo:pos + 1])
    return out


def inputs(b=2, t_q=40, t_k=40, h=4, h_kv=4, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t_q, h, d, generator=g, dtype=dtype).to(device)
    k = torch.randn(b, t_k, h_kv, d, generator=g, dtype=dtype).to(device)
    v = torch.randn(b, t_k, h_kv, d, generator=g, dtype=dtype).to(device)
    return q, k, v


CASES = [  # (t_q, t_k, h_kv, window)
    (40, 40, 4, 40),   # full causal (window >= T)
    (40, 40, 4, 7),    # sliding window: 8 keys per query (small: explicit mask)
    (40, 40, 4, 16),   # banded query blocks, T not a multiple of the window (padded end)
    (64, 64, 2, 16),   # banded with GQA, 4 whole blocks
    (48, 48, 1, 24),   # banded, band = the whole sequence (2 blocks), multi-query
    (40, 40, 2, 0),    # only itself, with GQA
    (5, 40, 4, 7),     # KV cache: 5 new queries at positions 35..39
    (1, 40, 2, 10),    # one decoding query, window respected (11 keys)
    (1, 40, 4, 100),   # one decoding query sees the whole cache
]


@pytest.mark.parametrize("t_q,t_k,h_kv,window", CASES)
def test_sdpa_forward_and_gradients(t_q, t_k, h_kv, window):
    q, k, v = inputs(t_q=t_q, t_k=t_k, h_kv=h_kv)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = attention(q, k, v, window, backend="sdpa")
    ref = naive(q, k, v, window)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,h_kv", [(40, 4), (41, 2), (48, 1)])  # even, odd T (unequal halves) with GQA, MQA
def test_causal_query_halves_match_reference(monkeypatch, t, h_kv):
    """Full-context CPU attention as two query halves (the second with the bottom-right causal mask), forced
    on at small T: the same attention and gradients as the float64 reference."""
    import titanlite.attention as attn

    monkeypatch.setattr(attn, "CPU_CAUSAL_HALVES", (t, t))
    assert attn.uses_causal_halves(t, "cpu") and not attn.uses_causal_halves(t, "cuda")
    calls = []
    real = attn.F.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    q, k, v = inputs(t_q=t, t_k=t, h_kv=h_kv)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = attention(q, k, v, t, backend="sdpa")
    assert [shape[2] for shape in calls] == [t // 2, t - t // 2]  # two query halves, not one causal call
    ref = naive(q, k, v, t)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g.double())):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


def test_causal_query_halves_only_where_they_were_measured_faster():
    from titanlite.attention import uses_causal_halves

    assert [t for t in (256, 384, 512, 768, 1024, 2048) if uses_causal_halves(t, "cpu")] == [384, 512]


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # "called without torch.compile"
@pytest.mark.parametrize("t_q,t_k,h_kv,window", [(256, 256, 4, 300), (256, 256, 4, 63), (128, 256, 2, 63)])
def test_flex_forward_on_cpu(t_q, t_k, h_kv, window):
    # CPU flex has no backward in this torch: forward only, under no_grad
    q, k, v = inputs(b=1, t_q=t_q, t_k=t_k, h_kv=h_kv, d=16)
    with torch.no_grad():
        out = attention(q, k, v, window, backend="flex")
    torch.testing.assert_close(out.double(), naive(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_window_mask_semantics_and_cache():
    m = window_mask(3, 6, 2, torch.device("cpu"))
    expected = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)  # window 2 -> 3 keys, queries at positions 3..5
    assert window_mask(3, 6, 2, torch.device("cpu")) is m


def test_select_on_cpu_warns_and_prefers_sdpa():
    name, lines = select_attention_backend("auto", "cpu", torch.float32, "SSSL")
    assert name == "sdpa"
    assert lines[0] == ("WARNING: Flash Attention 3 not available, using PyTorch SDPA fallback. "
                        "Training will be less efficient. Skipped: FA3 (kernel hub), FA3 (flash_attn_interface), "
                        "FA4 (flash-attn-4), flash-attn 2: no CUDA GPU; flex_attention: no backward on cpu in "
                        "this PyTorch (forward only).")
    # on CPU the seed's GPU warning about SDPA and sliding windows does not apply: the line says what runs
    assert lines[1].startswith("Attention on CPU: SDPA runs the sliding-window layers (pattern SSSL) as banded "
                               "query blocks")
    assert not any("GPU utilization" in line for line in lines)
    name, lines = select_attention_backend("auto", "cpu", torch.bfloat16, "L")
    assert name == "sdpa" and len(lines) == 1


def test_forced_sdpa_on_a_gpu_keeps_the_seed_warning_about_sliding_windows():
    name, lines = select_attention_backend("sdpa", "cuda", torch.bfloat16, "SSSL")
    assert name == "sdpa"
    assert lines[1].startswith("WARNING: SDPA has no support for sliding window attention (pattern SSSL)")
    assert "GPU utilization will be terrible" in lines[1] and "--window-pattern L" in lines[1]


@pytest.mark.parametrize("forced", ["fa3", "fa4", "flash_attn", "flex"])
def test_forcing_an_unavailable_backend_is_a_user_error(forced):
    assert not backend_available(forced, "cpu", torch.bfloat16)[0]
    with pytest.raises(UserError, match=f"model.attention_backend = '{forced}' is not available"):
        select_attention_backend(forced, "cpu", torch.bfloat16, "SSSL")


def test_unknown_backend_and_forced_sdpa():
    with pytest.raises(UserError, match="unknown"):
        select_attention_backend("xformers", "cpu", torch.float32, "L")
    assert select_attention_backend("sdpa", "cpu", torch.float32, "SSSL")[0] == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["fa3", "fa4", "flash_attn", "flex", "sdpa"])
@pytest.mark.parametrize("t_q,t_k,h_kv,window", [(256, 256, 4, 300), (256, 256, 2, 63), (64, 256, 4, 63)])
def test_gpu_backends_match_reference(backend, t_q, t_k, h_kv, window):
    dtype = torch.bfloat16
    if not backend_available(backend, "cuda", dtype)[0]:
        pytest.skip(f"{backend} not available here")
    q, k, v = inputs(b=2, t_q=t_q, t_k=t_k, h_kv=h_kv, d=64, dtype=dtype, device="cuda")
    for x in (q, k, v):
        x.requires_grad_(True)
    out = attention(q, k, v, window, backend=backend)
    ref = naive(q, k, v, window)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=5e-2, rtol=5e-2)
