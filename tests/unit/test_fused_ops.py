"""The model's hand-fused ops (softcap + cross-entropy head, RMSNorm, RoPE, relu^2) against their textbook forms."""

import pytest
import torch
import torch.nn.functional as F

from titanlite.models.gpt import ops as gpt_ops
from titanlite.models.gpt.model import relu_squared, softcapped_cross_entropy
from titanlite.models.gpt.ops import apply_rotary, rotary_norm


def reference_head_loss(x, weight, targets, softcap, vocab, reduction):
    logits = (x @ weight[:vocab].T).float()
    z = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(z, targets, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("softcap", [15.0, 100.0])  # 100: past the shift-free bound, the row-max path
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("vocab_dim", [0, 1])  # vocab-major logits (CPU) and rows-major (GPU)
def test_fused_head_matches_reference_loss_and_gradients(monkeypatch, softcap, reduction, vocab_dim):
    monkeypatch.setitem(gpt_ops.HEAD_CHUNK_ELEMENTS, "cpu", 7 * 96)  # 7 rows per chunk: 5 chunks, last partial
    monkeypatch.setitem(gpt_ops.VOCAB_DIM, "cpu", vocab_dim)
    g = torch.Generator().manual_seed(0)
    vocab, padded = 90, 96
    x = torch.randn(33, 24, generator=g, requires_grad=True)
    weight = (torch.randn(padded, 24, generator=g) * 4.0).requires_grad_(True)  # big logits: the cap bites
    targets = torch.randint(0, vocab, (33,), generator=g)
    targets[[0, 9, 10, 32]] = -1
    got = softcapped_cross_entropy(x, weight, targets, softcap, vocab, reduction)
    want = reference_head_loss(x, weight, targets, softcap, vocab, reduction)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    scale = torch.tensor(0.7)  # a non-unit upstream gradient must rescale both gradients
    got_grads = torch.autograd.grad(got * scale, (x, weight))
    want_grads = torch.autograd.grad(want * scale, (x, weight))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch.all(got_grads[1][vocab:] == 0)  # vocab padding rows get no gradient


@pytest.mark.parametrize("vocab_dim", [0, 1])
def test_fused_head_without_grad_matches_reference(monkeypatch, vocab_dim):
    monkeypatch.setitem(gpt_ops.VOCAB_DIM, "cpu", vocab_dim)
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(20, 16, generator=g), torch.randn(64, 16, generator=g) * 3
    targets = torch.randint(0, 60, (20,), generator=g)
    with torch.no_grad():
        got = softcapped_cross_entropy(x, weight, targets, 15.0, 60, "sum")
    torch.testing.assert_close(got, reference_head_loss(x, weight, targets, 15.0, 60, "sum"))


def textbook_rotary(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def test_rotary_matches_textbook_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    angles = torch.rand(1, 6, 1, 4, generator=g, dtype=torch.float64) * 6
    cos, sin = angles.cos(), angles.sin()
    torch.testing.assert_close(apply_rotary(x, cos, sin), textbook_rotary(x, cos, sin))
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))
    assert not torch.equal(apply_rotary(x, cos, sin), x)  # a real rotation, not the identity


def test_rotary_norm_is_the_textbook_qk_norm_after_rope_and_gradchecks():
    """scale * rms_norm(rope(x)) in float64: forward and the analytic backward against the textbook ops (tables
    from float angles, as the model's are) and gradcheck."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    angles = torch.rand(1, 6, 1, 4, generator=g, dtype=torch.float64) * 6
    cos, sin = angles.float().cos().double(), angles.float().sin().double()  # cos^2 + sin^2 != 1 exactly
    eps = torch.finfo(torch.float64).eps
    want = F.rms_norm(textbook_rotary(x, cos, sin), (8,), eps=eps) * 1.2
    torch.testing.assert_close(rotary_norm(x, cos, sin, 1.2), want, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: rotary_norm(t, cos, sin, 1.2), (x,))


def test_rotary_norm_in_bf16_rounds_once():
    """bf16 q / k with fp32 tables: the fused QK path is within half a bf16 ulp of the float64 result (one
    rounding); RoPE then the norm apart round twice, which the same inputs show exceeds that bound."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 64, 2, 128, generator=g) * 3).bfloat16()
    angles = torch.rand(1, 64, 1, 64, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    exact = F.rms_norm(textbook_rotary(x.double(), cos.double(), sin.double()), (128,),
                       eps=torch.finfo(torch.float32).eps) * 1.2
    half_ulp = 2.0 ** -8 * exact.abs() * (1 + 1e-4)  # half a bf16 ulp, + fp32 arithmetic before the rounding
    assert torch.all((rotary_norm(x, cos, sin, 1.2).double() - exact).abs() <= half_ulp)
    two_roundings = gpt_ops.rms_norm(apply_rotary(x, cos, sin), 1.2).double()
    assert bool(((two_roundings - exact).abs() > half_ulp).any())


def test_relu_squared_matches_textbook_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(relu_squared(x), F.relu(x).square())
    assert torch.autograd.gradcheck(relu_squared, (x,))
    grad = torch.autograd.grad(relu_squared(x).sum(), x)[0]
    torch.testing.assert_close(grad, 2 * F.relu(x))


def textbook_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


@pytest.mark.parametrize("scale", [1.0, 1.2])
def test_rms_norm_matches_textbook_and_gradcheck(scale):
    from titanlite.models.gpt.ops import rms_norm

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 5, 16, generator=g, dtype=torch.float64) * 0.01).requires_grad_()  # eps matters here
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(rms_norm(x, scale), scale * textbook_rms_norm(x, eps))
    assert torch.autograd.gradcheck(lambda t: rms_norm(t, scale), (x,))
    # fp32, with a non-trivial upstream gradient, against autograd through the textbook form in fp64
    x32 = torch.randn(4, 64, 32, generator=g).requires_grad_()
    up = torch.randn(4, 64, 32, generator=g)
    got = torch.autograd.grad((rms_norm(x32, scale) * up).sum(), x32)[0]
    x64 = x32.detach().double().requires_grad_()
    want = torch.autograd.grad((scale * textbook_rms_norm(x64, torch.finfo(torch.float32).eps) * up).sum(), x64)[0]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_rms_norm_in_bf16_rounds_once():
    # bf16 activations: statistics in fp32 with fp32's eps (not bf16's 2^-7), and scale * x / rms rounded to bf16
    # once, so every element is within half a bf16 ulp (at most 2^-8 relative) of the exact value; F.rms_norm(x) * scale
    # rounds twice and is up to ~2^-7 off
    from titanlite.models.gpt.ops import rms_norm

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 32, 64, generator=g) * 0.03).bfloat16().requires_grad_()
    exact = textbook_rms_norm(x.detach().double(), torch.finfo(torch.float32).eps) * 1.2
    got = rms_norm(x, 1.2)
    assert got.dtype == torch.bfloat16
    half_ulp = 2.0 ** -8 * (1 + 1e-4)  # the fp32 statistics add ~1e-7 relative
    assert torch.all((got.double() - exact).abs() <= half_ulp * exact.abs())
    twice = (textbook_rms_norm(x.detach().double(), torch.finfo(torch.float32).eps).bfloat16() * 1.2).double()
    assert torch.any((twice - exact).abs() > half_ulp * exact.abs())  # the bound does tell the two apart


def test_embedding_backward_under_compile_is_eagers_fixed_order_sum():
    """ops.embedding compiled by inductor: the table gradient equals eager nn.Embedding's bit for bit (64 rows,
    each index repeated ~64 times). A plain compiled F.embedding sums the same rows with atomics across threads
    and measured up to 9.5e-6 away from eager here, which broke bitwise resume under a whole-model compile."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(64, 32, generator=g, requires_grad=True)
    idx = torch.randint(0, 64, (8, 512), generator=g)
    upstream = torch.randn(8, 512, 32, generator=g)
    want = torch.autograd.grad(F.embedding(idx, table), table, upstream)[0]
    torch._dynamo.reset()
    compiled = torch.compile(gpt_ops.embedding, fullgraph=True)
    out = compiled(table, idx)
    assert torch.equal(out, F.embedding(idx, table))
    assert torch.equal(torch.autograd.grad(out, table, upstream)[0], want)
