"""bf16 parameter gradients of the GPT's mixing ops (mix_ops) against float64 textbook formulas.

Each case feeds the same bf16-representable inputs to the op in bf16 and to the plain formula in float64, with an
upstream gradient built to cancel (as the rms-norm backward makes the real one nearly orthogonal to the stream),
so the true gradient is small against its terms. The bound allows what rounding the final result to bf16 costs
(2^-8 relative) plus fp32 summation (2^-20 of the sum of |terms|); rounding every product to bf16, as eager
bf16 autograd does, costs ~2^-9 sqrt(sum of terms^2), which each test also shows is far outside the bound.
"""

import torch

from titanlite.models.gpt import mix_ops

BF16_RESULT = 2.0 ** -8
FP32_SUM = 2.0 ** -20


def bf16_values(*shape, gen, scale=1.0):
    """float64 tensor of bf16-representable values."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).bfloat16().double()


def cancelling(reference_dirs, gen):
    """A bf16-representable upstream gradient orthogonal to each tensor in reference_dirs up to its own rounding
    to bf16 (what is left of sum g x is that rounding: ~1e-4 of sum |g x|)."""
    g = torch.randn(reference_dirs[0].shape, generator=gen, dtype=torch.float64)
    for d in reference_dirs:
        g = g - (g * d).sum() / (d * d).sum() * d
    return g.bfloat16().double()


def within_bound(got, want, terms_abs_sum):
    """|got - want| <= 2^-8 |want| + 2^-20 sum|terms|, elementwise; returns the worst ratio error / bound."""
    bound = BF16_RESULT * want.abs() + FP32_SUM * terms_abs_sum
    return float(((got.double() - want).abs() / bound).max())


def test_scaled_sum_scalar_gradients_are_fp32_reductions(monkeypatch):
    monkeypatch.setitem(mix_ops.MIX_CHUNK_ELEMENTS, "cpu", 1000)  # several chunks, the last one partial
    gen = torch.Generator().manual_seed(0)
    x, y = bf16_values(8, 64, 48, gen=gen), bf16_values(8, 64, 48, gen=gen)
    g = cancelling([x, y], gen)
    a, b = torch.tensor(1.1), torch.tensor(0.17)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    xb, yb = x.bfloat16().requires_grad_(), y.bfloat16().requires_grad_()
    out = mix_ops.scaled_sum(xb, a_, yb, b_)
    out.backward(g.bfloat16())
    want_a, want_b = (g * x).sum(), (g * y).sum()  # d(a x + b y)/da = sum g x
    assert within_bound(a_.grad, want_a, (g * x).abs().sum()) <= 1.0
    assert within_bound(b_.grad, want_b, (g * y).abs().sum()) <= 1.0
    # activations: g a and g b rounded once each (half an ulp: at most 2^-8 relative)
    assert torch.all((xb.grad.double() - g * 1.1).abs() <= 2.0 ** -8 * (g * 1.1).abs() + 1e-30)
    # forward: a x + b y rounded once
    exact = 1.1 * x + 0.17 * y
    assert torch.all((out.detach().double() - exact).abs() <= 2.0 ** -8 * exact.abs() * (1 + 1e-6))

    # eager bf16 autograd of the same formula is far outside the bound on the same numbers
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    (a_.bfloat16() * x.bfloat16() + b_.bfloat16() * y.bfloat16()).backward(g.bfloat16())
    assert within_bound(a_.grad, want_a, (g * x).abs().sum()) > 4.0


def test_scaled_sum_mixed_dtypes_keep_each_input_dtype():
    gen = torch.Generator().manual_seed(1)
    x = bf16_values(2, 5, 8, gen=gen).bfloat16().requires_grad_()
    y = bf16_values(2, 5, 8, gen=gen).float().requires_grad_()  # the fp32 x0 stream
    a, b = torch.tensor(0.5, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    out = mix_ops.scaled_sum(x, a, y, b, out_dtype=torch.bfloat16)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and y.grad.dtype == torch.float32
    torch.testing.assert_close(y.grad, torch.full_like(y, 2.0))
    torch.testing.assert_close(b.grad, y.detach().sum())


def textbook_smear(x, lam, w):
    cur, prev = x[:, 1:], x[:, :-1]
    gate = lam * torch.sigmoid(cur[..., :w.size(-1)] @ w.t())
    return torch.cat([x[:, :1], cur + gate * prev], dim=1)


def test_smear_parameter_gradients_are_fp32_reductions():
    gen = torch.Generator().manual_seed(2)
    B, T, C, k = 4, 128, 64, 24
    x = bf16_values(B, T, C, gen=gen)
    prev_stream = torch.cat([torch.zeros(B, 1, C, dtype=torch.float64), x[:, :-1]], dim=1)
    g = cancelling([prev_stream], gen)  # the gate's gradient, sum_c g_t x_{t-1}, cancels over tokens
    lam = torch.tensor([0.3])
    w = (torch.rand(1, k, generator=gen) * 0.02).bfloat16().float()
    lam64, w64, x64 = lam.double().requires_grad_(), w.double().requires_grad_(), x.clone().requires_grad_()
    textbook_smear(x64, lam64, w64).backward(g)
    lam_, w_ = lam.clone().requires_grad_(), w.clone().requires_grad_()
    xb = x.bfloat16().requires_grad_()
    mix_ops.smear(xb, lam_, w_).backward(g.bfloat16())
    s = torch.sigmoid(x[:, 1:, :k] @ w.double().t())
    lam_terms = (s * g[:, 1:] * x[:, :-1]).abs().sum()
    assert within_bound(lam_.grad, lam64.grad, lam_terms) <= 1.0
    w_terms = ((0.3 * s * (1 - s)) * (g[:, 1:] * x[:, :-1]).abs().sum(-1, keepdim=True) * x[:, 1:, :k].abs())
    assert within_bound(w_.grad, w64.grad, w_terms.sum((0, 1))) <= 1.0
    # the stream's own gradient: an fp32 result rounded once per element (half a bf16 ulp: 2^-8 relative at most)
    torch.testing.assert_close(xb.grad.double(), x64.grad, rtol=2.0 ** -8, atol=1e-6 * float(g.abs().max()))

    # eager bf16 autograd of the textbook smear misses the bound on the same numbers
    lam_, w_ = lam.clone().requires_grad_(), w.clone().requires_grad_()
    xb = x.bfloat16()
    cur, prev = xb[:, 1:], xb[:, :-1]
    gate = lam_.bfloat16() * torch.sigmoid(cur[..., :k] @ w_.bfloat16().t())
    torch.cat([xb[:, :1], cur + gate * prev], dim=1).backward(g.bfloat16())
    assert within_bound(lam_.grad, lam64.grad, lam_terms) > 4.0


def textbook_gated_add(v, ve, x_k, w, scale):
    return v + scale * torch.sigmoid(x_k @ w.t()).unsqueeze(-1) * ve


def test_value_gate_weight_gradient_is_an_fp32_reduction():
    gen = torch.Generator().manual_seed(3)
    B, T, H, D, k = 4, 96, 2, 64, 12
    v, ve = bf16_values(B, T, H, D, gen=gen), bf16_values(B, T, H, D, gen=gen)
    x_k = bf16_values(B, T, k, gen=gen)
    g = cancelling([ve], gen)
    w = (torch.rand(H, k, generator=gen) * 0.02).bfloat16().float()
    w64 = w.double().requires_grad_()
    textbook_gated_add(v, ve, x_k, w64, 3.0).backward(g)
    w_ = w.clone().requires_grad_()
    mix_ops.gated_add(v.bfloat16(), ve.bfloat16(), x_k.bfloat16(), w_, 3.0).backward(g.bfloat16())
    s = torch.sigmoid(x_k @ w.double().t())                                     # (B, T, H)
    per_token = (3.0 * s * (1 - s)) * (g * ve).abs().sum(-1)                   # |terms| summed over D
    terms = torch.einsum("bth,btk->hk", per_token, x_k.abs())
    assert within_bound(w_.grad, w64.grad, terms) <= 1.0

    w_ = w.clone().requires_grad_()
    xb = x_k.bfloat16()
    gate = 3 * torch.sigmoid(xb @ w_.bfloat16().t())
    (v.bfloat16() + gate.unsqueeze(-1) * ve.bfloat16()).backward(g.bfloat16())
    assert within_bound(w_.grad, w64.grad, terms) > 4.0


def test_fused_head_applies_the_upstream_scale_unrounded():
    """The loss is divided by the token count in bf16 runs: grad_x is scaled in fp32 and rounded once (before,
    the scale itself was rounded to bf16, a systematic 2^-9-relative error on every element, then the product)."""
    from titanlite.models.gpt.ops import softcapped_cross_entropy

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 32, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(64, 32, generator=gen) * 0.5).bfloat16()
    targets = torch.randint(0, 64, (40,), generator=gen)
    (unscaled,) = torch.autograd.grad(softcapped_cross_entropy(x, weight, targets, 15.0, 64, "sum"), x)
    (scaled,) = torch.autograd.grad(softcapped_cross_entropy(x, weight, targets, 15.0, 64, "sum") / 3.0, x)
    want = unscaled.double() / 3.0  # the same bf16 gradient, exactly divided
    assert torch.all((scaled.double() - want).abs() <= 2.0 ** -8 * want.abs())
    rounded_scale = unscaled * torch.tensor(1 / 3.0).bfloat16()  # the old backward
    assert torch.any((rounded_scale.double() - want).abs() > 2.0 ** -8 * want.abs())


def test_fused_head_compiled_chunk_matches_the_eager_chunk(monkeypatch):
    """The chunk kernel CUDA runs compiled (COMPILED_HEAD_DEVICES), exercised here on CPU by inductor: the same
    loss and gradients as the eager chunk."""
    from titanlite.models.gpt import ops as gpt_ops

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(24, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(64, 16, generator=gen) * 3.0).requires_grad_()
    targets = torch.randint(0, 60, (24,), generator=gen)
    targets[3] = -1
    monkeypatch.setitem(gpt_ops.HEAD_CHUNK_ELEMENTS, "cpu", 8 * 64)  # 3 chunks of 8 rows
    eager = gpt_ops.softcapped_cross_entropy(x, weight, targets, 15.0, 60, "sum")
    eager_grads = torch.autograd.grad(eager, (x, weight))
    monkeypatch.setattr(gpt_ops, "COMPILED_HEAD_DEVICES", {"cpu"})
    monkeypatch.setattr(gpt_ops, "_compiled_chunk_kernel", None)
    assert gpt_ops._chunk_kernel("cpu") is not gpt_ops._chunk_loss_and_grad
    compiled = gpt_ops.softcapped_cross_entropy(x, weight, targets, 15.0, 60, "sum")
    compiled_grads = torch.autograd.grad(compiled, (x, weight))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_rotary_in_bf16_rounds_once_with_fp32_tables():
    """bf16 q/k rotated by fp32 tables: each output within half a bf16 ulp of the exact rotation (plus fp32's own
    rounding of the two products), where rounding the products and the sum in bf16 misses that bound."""
    from titanlite.models.gpt.ops import apply_rotary

    gen = torch.Generator().manual_seed(6)
    x = bf16_values(2, 64, 2, 16, gen=gen)
    angles = torch.rand(1, 64, 1, 8, generator=gen, dtype=torch.float64) * 6
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2, c, s = x[..., :8], x[..., 8:], cos.double(), sin.double()
    exact = torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)
    terms = torch.cat([(x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()], dim=-1)
    got = apply_rotary(x.bfloat16(), cos, sin)
    assert got.dtype == torch.bfloat16
    assert torch.all((got.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + 2.0 ** -22 * terms)
    in_bf16 = apply_rotary(x.bfloat16(), cos.bfloat16(), sin.bfloat16())  # tables and arithmetic in bf16
    assert torch.any((in_bf16.double() - exact).abs() > 2.0 ** -8 * exact.abs() + 2.0 ** -22 * terms)


def test_head_weight_gradient_accumulates_in_fp32_on_fake_cuda_tensors():
    """The CUDA branch of the head's weight-gradient accumulation (bf16 operands, the GEMM's fp32 output added
    into the fp32 buffer) on fake CUDA tensors: dispatch, shapes and dtypes only (this build has no CUDA
    kernels, and views of fake CUDA tensors need a device guard it lacks, so the whole head cannot run here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from titanlite.models.gpt.ops import _accumulate_weight_grad

    with FakeTensorMode():
        acc = torch.zeros(128, 32, device="cuda")
        grad_t = torch.empty(128, 300, dtype=torch.bfloat16, device="cuda")
        x_c = torch.empty(300, 32, dtype=torch.bfloat16, device="cuda")
        _accumulate_weight_grad(acc, grad_t, x_c)
        assert acc.dtype == torch.float32 and acc.shape == (128, 32) and acc.device.type == "cuda"


def test_rms_norm_of_an_fp32_stream_into_bf16_has_an_exactly_orthogonal_gradient():
    """The fp32 residual stream normed into bf16 for the matmuls: its gradient comes back in fp32, orthogonal to
    each row of x up to fp32 rounding (d loss / dx of x / rms(x) has no component along x). Projecting on the
    bf16-rounded output instead leaves ~2^-9 |g| |x| per row, which the per-layer scalars' gradients (sums of
    dx . x0, x0 a component of x) collect."""
    from titanlite.models.gpt.ops import rms_norm

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 32, 256, generator=gen).requires_grad_()
    g = torch.randn(4, 32, 256, generator=gen).bfloat16()
    y = rms_norm(x, 1.0, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    assert x.grad.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    torch.nn.functional.rms_norm(x64, (256,), eps=torch.finfo(torch.float32).eps).backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    scale = (x.grad.norm(dim=-1) * x.detach().norm(dim=-1))
    assert float(((x.grad * x.detach()).sum(-1).abs() / scale).max()) < 2.0 ** -18
    # the same backward on the rounded output (n = y): orthogonal to y, not to x
    n = y.detach().double()
    gd = g.double()
    r = 1.0 / x64.detach().pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
    dx_rounded = r * (gd - n * (gd * n).mean(-1, keepdim=True))
    assert float(((dx_rounded * x64.detach()).sum(-1).abs() / scale.double()).max()) > 2.0 ** -14


def test_rms_norm_sums_its_consumers_bf16_gradients_in_fp32():
    """An attention input feeds four bf16 consumers (q, k, v projections and the value gate). rms_norm(copies=4)
    hands each its own alias and sums their gradients in fp32 inside the norm's backward, so the stream gradient
    is the float64 textbook norm backward of g1 + g2 + g3 + g4 up to fp32 arithmetic. Eager autograd adds the four
    bf16 gradients in bf16 first: three roundings of partial sums as large as each g_i, far outside that bound
    when the sum is small against its terms (here the consumers' gradients cancel to ~1/8 of each)."""
    from titanlite.models.gpt.ops import rms_norm

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 32, 256, generator=gen, dtype=torch.float64).float()
    base = torch.randn(4, 32, 256, generator=gen, dtype=torch.float64)
    grads = [base, -base, 0.5 * base, -0.375 * base]  # sum = 1/8 base, before each is perturbed and rounded
    grads = [(g + 0.02 * torch.randn(g.shape, generator=gen, dtype=torch.float64)).bfloat16() for g in grads]

    def textbook(upstream):  # float64 d/dx of sum(upstream * x / rms(x)), fp32's eps as F.rms_norm uses
        x64 = x.double().requires_grad_()
        torch.nn.functional.rms_norm(x64, (256,), eps=torch.finfo(torch.float32).eps).backward(upstream)
        return x64.grad

    want = textbook(sum(g.double() for g in grads))
    terms = sum(textbook(g.double()).abs() for g in grads)  # what each consumer alone contributes
    x_in = x.clone().requires_grad_()
    outs = rms_norm(x_in, 1.0, torch.bfloat16, copies=4)
    assert len(outs) == 4 and all(o.dtype == torch.bfloat16 for o in outs)
    torch.autograd.backward(list(outs), grads)
    assert x_in.grad.dtype == torch.float32
    assert within_bound(x_in.grad, want, terms) <= 1.0
    # the gate reads 12 channels: three full copies plus a prefix view, whose gradient lands on those channels
    grads[3][..., 12:] = 0
    want = textbook(sum(g.double() for g in grads))
    x_in = x.clone().requires_grad_()
    outs = rms_norm(x_in, 1.0, torch.bfloat16, copies=3, prefix=12)
    assert [tuple(o.shape) for o in outs] == [(4, 32, 256)] * 3 + [(4, 32, 12)]
    torch.autograd.backward(list(outs), grads[:3] + [grads[3][..., :12]])
    assert within_bound(x_in.grad, want, terms) <= 1.0

    # one output used four times: autograd sums the bf16 gradients in bf16 before the same backward
    x_in = x.clone().requires_grad_()
    y = rms_norm(x_in, 1.0, torch.bfloat16)
    sum((y.float() * g.float()).sum() for g in grads).backward()  # not fused: each product grad goes to y
    x_old = x.clone().requires_grad_()
    y_old = rms_norm(x_old, 1.0, torch.bfloat16)
    y_old.backward(grads[0] + grads[1] + grads[2] + grads[3])  # the bf16 sum autograd forms
    assert within_bound(x_old.grad, want, terms) > 4.0


def test_scaled_sum_of_fp32_streams_keeps_fp32_precision():
    """The fp32 residual stream's mix (a x + b y, all fp32): the scalars' gradients are fp32 dot products, within
    fp32 summation of the float64 ones; the activation gradients are g a and g b rounded once to fp32."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 64, 48, generator=gen), torch.randn(8, 64, 48, generator=gen)
    g = cancelling([x.double(), y.double()], gen).float()
    a, b = torch.tensor(1.1, requires_grad=True), torch.tensor(0.17, requires_grad=True)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = mix_ops.scaled_sum(xs, a, ys, b)
    assert out.dtype == torch.float32
    out.backward(g)
    for got, other in ((a.grad, x), (b.grad, y)):
        terms = (g.double() * other.double())
        assert abs(float(got) - float(terms.sum())) <= 2.0 ** -20 * float(terms.abs().sum())
    torch.testing.assert_close(xs.grad.double(), g.double() * a.item(), rtol=2.0 ** -23, atol=0)
    ax, by = a.item() * x.double(), b.item() * y.double()  # a x rounded, then the sum rounded: 2^-24 each
    assert torch.all((out.detach().double() - (ax + by)).abs() <= 2.0 ** -23 * (ax.abs() + by.abs()))
