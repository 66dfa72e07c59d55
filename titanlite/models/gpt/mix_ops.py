"""The GPT's learned mixing of whole activations by a few numbers: residual / x0 / backout scalars, the smear
and the value-embedding gates, as autograd functions whose parameter gradients are fp32 reductions.

Each of these parameters' gradient is a sum over every token (and channel) of grad x activation: ~2 M products
per scalar at d4 on 8k tokens, 10^9 at d26 on a GPU batch. Eager bf16 autograd rounds every product to bf16
before summing them and the sum to bf16 after, and the true sum is small against its terms (at initialisation the
scalars' gradients vanish exactly), so what AdamW saw was mostly rounding: the per-layer scalars' bf16 gradients
measured 45-160 % away from the fp32 ones on a trained d4. Here the products are formed from fp32 upcasts and
summed in fp32 (a chunk at a time, so the fp32 temporaries stay in cache and never hold a whole activation), and
the forward, too, is computed in fp32 and rounded once, as a compiled graph does inside its fused kernels.
In fp32 / fp64 the arithmetic is the same textbook formula in that dtype.
"""

from __future__ import annotations

import torch

# elements per fp32 chunk: 1 MiB on CPU (stays in L2 beside its inputs); on CUDA one chunk per 64 Mi elements
# so a d26 batch costs a handful of kernel launches, not thousands
MIX_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) of two (rows, width) tensors as per-row dot products summed by ATen's cascade sum. Over 1 M
    fp32 products whose sum cancels to ~0 (the scalars' gradients at initialisation) it measured 15x nearer the
    float64 value than torch.dot's BLAS running sums (2.6e-4 vs 3.7e-3 against a sum of |products| of 2e6), in
    about the same time (0.18 vs 0.12 ms)."""
    return torch.linalg.vecdot(a, b).sum()


def _row_chunks(rows: int, width: int, device: torch.device):
    """(start, stop) row ranges of about MIX_CHUNK_ELEMENTS elements each (eager only: inside a compiled graph
    inductor fuses the whole upcast-multiply-reduce into one loop, where a Python loop would unroll into many
    small kernels)."""
    step = max(1, MIX_CHUNK_ELEMENTS.get(device.type, 1 << 22) // width)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


class _ScaledSum(torch.autograd.Function):
    """out = a x + b y for 0-d scalars a, b (fp32 parameters) and activations x, y of one shape, in out_dtype."""

    @staticmethod
    def forward(ctx, x, a, y, b, out_dtype):
        work = _work_dtype(out_dtype)
        ctx.save_for_backward(x, a, y, b)
        ctx.x_dtype = x.dtype
        if torch.compiler.is_compiling():  # inductor fuses this into one pass and rounds once
            return (x.to(work) * a.to(work) + y.to(work) * b.to(work)).to(out_dtype)
        if x.dtype == y.dtype == out_dtype == work:  # the fp32 stream: two passes, nothing to upcast
            return torch.mul(x, a).addcmul_(y, b)
        width = x.size(-1)
        x2, y2 = x.reshape(-1, width), y.reshape(-1, width)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        out2 = out.view(-1, width)
        a_w, b_w = a.to(work), b.to(work)
        for r0, r1 in _row_chunks(x2.size(0), width, x.device):
            out2[r0:r1] = torch.mul(x2[r0:r1].to(work), a_w).add_(y2[r0:r1].to(work) * b_w)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, a, y, b = ctx.saved_tensors
        need_x, need_a, need_y, need_b = ctx.needs_input_grad[:4]
        work = _work_dtype(grad.dtype)
        a_w, b_w = a.to(work), b.to(work)
        if torch.compiler.is_compiling():
            g = grad.to(work)
            return ((g * a_w).to(ctx.x_dtype) if need_x else None,
                    torch.sum(g * x.to(work)).to(a.dtype) if need_a else None,
                    (g * b_w).to(y.dtype) if need_y else None,
                    torch.sum(g * y.to(work)).to(b.dtype) if need_b else None, None)
        width = x.size(-1)
        g2, x2, y2 = grad.reshape(-1, width), x.reshape(-1, width), y.reshape(-1, width)
        grad_a = torch.zeros((), dtype=work, device=x.device)
        grad_b = torch.zeros((), dtype=work, device=x.device)
        grad_x = torch.empty(x.shape, dtype=ctx.x_dtype, device=x.device) if need_x else None
        grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device) if need_y else None
        gx2 = grad_x.view(-1, width) if need_x else None
        gy2 = grad_y.view(-1, width) if need_y else None
        # the fp32 stream needs no upcast copies, so no chunks; bf16 operands are upcast a chunk of rows at a time
        upcasts = not (g2.dtype == x2.dtype == y2.dtype == work)
        for r0, r1 in _row_chunks(g2.size(0), width, x.device) if upcasts else [(0, g2.size(0))]:
            g_c = g2[r0:r1].to(work)
            if need_a:
                grad_a += _sum_of_products(g_c, x2[r0:r1].to(work))
            if need_b:
                grad_b += _sum_of_products(g_c, y2[r0:r1].to(work))
            if need_x:
                torch.mul(g_c, a_w, out=gx2[r0:r1])
            if need_y:
                torch.mul(g_c, b_w, out=gy2[r0:r1])
        return (grad_x, grad_a.to(a.dtype) if need_a else None, grad_y, grad_b.to(b.dtype) if need_b else None,
                None)


def scaled_sum(x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, b: torch.Tensor,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a x + b y in out_dtype (default x's dtype): a, b are 0-d (fp32 master) scalars, used unrounded; x, y
    may be of different dtypes (e.g. a bf16 x with the fp32 x0)."""
    if y is x:  # the first layer mixes x0 with itself; Dynamo cannot trace one tensor passed twice, a view it can
        y = y.view_as(y)
    return _ScaledSum.apply(x, a.reshape(()), y, b.reshape(()), out_dtype or x.dtype)


class _Smear(torch.autograd.Function):
    """out_t = x_t + lam sigmoid(w . x_t[:k]) x_{t-1} for t >= 1, out_0 = x_0, over (B, T, C)."""

    @staticmethod
    def forward(ctx, x, lam, w):
        work = _work_dtype(x.dtype)
        k = w.size(-1)
        cur, prev = x[:, 1:], x[:, :-1]
        gate_in = cur[..., :k].to(work)
        s = torch.sigmoid(gate_in @ w.to(work).t())              # (B, T-1, 1)
        gate = s * lam.to(work)
        out = torch.empty_like(x)
        out[:, :1] = x[:, :1]
        out[:, 1:] = torch.addcmul(cur.to(work), gate, prev.to(work))
        ctx.save_for_backward(x, lam, w, s)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lam, w, s = ctx.saved_tensors
        work = s.dtype
        k = w.size(-1)
        cur, prev = x[:, 1:], x[:, :-1]
        g_cur = grad[:, 1:].to(work)
        h = torch.linalg.vecdot(g_cur, prev.to(work)).unsqueeze(-1)   # d loss / d gate per token, fp32 sum over C
        grad_lam = (s * h).sum().reshape(lam.shape)
        grad_z = h.mul_(s * (1.0 - s)).mul_(lam.to(work))            # through the sigmoid
        grad_w = (grad_z.reshape(-1, 1).t() @ cur[..., :k].reshape(-1, k).to(work)).reshape(w.shape)
        grad_x = grad.to(work, copy=True)                           # the identity path
        grad_x[:, :-1].addcmul_(s * lam.to(work), g_cur)              # x_{t-1} feeds out_t through the gate
        grad_x[:, 1:, :k].add_(grad_z * w.to(work).reshape(-1))      # x_t[:k] feeds its own gate
        return grad_x.to(x.dtype), grad_lam.to(lam.dtype), grad_w.to(w.dtype)


def smear(x: torch.Tensor, lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Previous-token mixing of a (B, T, C) stream: lam (1,) and the gate weight w (1, k) are fp32 parameters."""
    return _Smear.apply(x, lam, w)


class _GatedAdd(torch.autograd.Function):
    """out = v + scale sigmoid(x_k @ w^T)[..., None] * ve, v and ve (B, T, H, D), x_k (B, T, k), w (H, k)."""

    @staticmethod
    def forward(ctx, v, ve, x_k, w, scale: float):
        work = _work_dtype(v.dtype)
        s = torch.sigmoid(x_k.to(work) @ w.to(work).t()).unsqueeze(-1)   # (B, T, H, 1)
        out = torch.addcmul(v.to(work), s, ve.to(work), value=scale).to(v.dtype)
        ctx.save_for_backward(ve, x_k, w, s)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        ve, x_k, w, s = ctx.saved_tensors
        work, scale = s.dtype, ctx.scale
        g = grad.to(work)
        h = torch.linalg.vecdot(g, ve.to(work))                   # (B, T, H): fp32 sum over the head dim
        grad_z = h.mul_((s * (1.0 - s)).squeeze(-1)).mul_(scale)
        k = x_k.size(-1)
        grad_w = grad_z.reshape(-1, w.size(0)).t() @ x_k.reshape(-1, k).to(work)
        grad_x_k = (grad_z @ w.to(work)).to(x_k.dtype)
        grad_ve = (g * s).mul_(scale).to(ve.dtype)
        return grad, grad_ve, grad_x_k, grad_w.to(w.dtype), None


def gated_add(v: torch.Tensor, ve: torch.Tensor, x_k: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    """The value residual v + scale sigmoid(x_k w^T) ve with one gate per (token, head); fp32 internals."""
    return _GatedAdd.apply(v, ve, x_k, w, scale)
