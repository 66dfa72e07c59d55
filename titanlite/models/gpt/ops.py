"""The GPT's CPU-friendly autograd kernels: RMSNorm, RoPE, relu^2 and the chunked softcap + cross-entropy head.

Each is the textbook operation with fewer passes over memory (and less saved for backward) than eager autograd
would make of it; the math is unchanged, so the model's forward in model.py reads like the recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

@torch.no_grad()
def fill_rope_tables(cos: torch.Tensor, sin: torch.Tensor, base: float) -> None:
    """Fill (1, positions, 1, head_dim / 2) RoPE tables in place: angle = position x base^(-2i / head_dim)."""
    device, hd = cos.device, 2 * cos.size(-1)
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
    t = torch.arange(cos.size(1), dtype=torch.float32, device=device)
    angles = torch.outer(t, inv_freq)[None, :, None, :]
    cos.copy_(angles.cos())
    sin.copy_(angles.sin())


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype | None = None):
    """(x1 c + x2 s, x2 c - x1 s) for halves x1, x2 of the last dim; cos2 is cos repeated for both halves.
    Computed in the tables' dtype (fp32 for bf16 activations) and rounded to out_dtype (default x's) once: in
    bf16 the product and the multiply-add would each round."""
    d = x.size(-1) // 2
    xw = x.to(torch.promote_types(x.dtype, cos2.dtype))
    y = xw * cos2
    y[..., :d].addcmul_(xw[..., d:], sin)
    y[..., d:].addcmul_(xw[..., :d], sin, value=-1.0)
    return y.to(out_dtype or x.dtype)


class _Rotary(torch.autograd.Function):
    """RoPE as one function: three passes over x instead of the seven (and a cat) of the textbook form, and
    backward is the inverse rotation of the gradient, so nothing but the tables is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos2 = torch.cat([cos, cos], dim=-1)
        ctx.save_for_backward(cos2, sin)
        return _rotate(x, cos2, sin)

    @staticmethod
    def backward(ctx, grad):
        cos2, sin = ctx.saved_tensors
        return _rotate(grad, cos2, -sin), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE on (B, T, H, D); cos/sin are (1, T, 1, D/2), fp32 tables for bf16 x (rounded once)."""
    return _Rotary.apply(x, cos, sin)


def _inv_rms(xf: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim of an fp32 / fp64 x, with that dtype's eps (F.rms_norm's)."""
    mean_square = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(xf.size(-1))
    return mean_square.add_(torch.finfo(xf.dtype).eps).rsqrt_()


def _remove_component(h: torch.Tensor, ref: torch.Tensor, factor) -> torch.Tensor:
    """h -= ref (h . ref) factor, row by row over the last dim, in place: the projection step of an rms-norm
    backward (factor: a number or a per-row tensor)."""
    coef = torch.linalg.vecdot(h, ref).unsqueeze_(-1).mul_(factor)
    return h.addcmul_(ref, coef, value=-1.0)


class _RotaryNorm(torch.autograd.Function):
    """The QK path, scale * rms_norm(rope(x)), as one function computed in fp32 and rounded once (the two ops
    apart round twice: RoPE's output, then the norm's; bf16 q / k gradients measured 2.2e-3 off float64 that
    way, 1.7e-3 fused). Backward is the norm's backward against the saved output y (what attention keeps as
    its q / k anyway, so nothing is saved beyond the fp32 1 / rms and the tables), then RoPE's transpose, the
    opposite turn:
        dx = R^T (h - y (h . y) / (s^2 D)),   h = s r g,  r = 1 / rms(rope(x)), s = scale
    On CPU that is 7 passes forward where the two ops make 9, and 9 backward where they make 10.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, scale: float):
        work = torch.promote_types(x.dtype, cos.dtype)  # fp32 tables for bf16 (fp64 for a float64 reference)
        cos2 = torch.cat([cos, cos], dim=-1)
        rotated = _rotate(x, cos2, sin, work)
        inv_rms = _inv_rms(rotated)
        y = rotated.mul_(inv_rms * scale).to(x.dtype)
        ctx.save_for_backward(y, inv_rms, cos2, sin)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        y, inv_rms, cos2, sin = ctx.saved_tensors
        work = inv_rms.dtype
        h = grad.to(work, copy=True).mul_(inv_rms * ctx.scale)
        _remove_component(h, y.to(work), 1.0 / (ctx.scale * ctx.scale * y.size(-1)))
        return _rotate(h, cos2, -sin, y.dtype), None, None, None


def rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * rms_norm(apply_rotary(x, cos, sin)) over the head dim of (B, T, H, D): the QK-norm after RoPE.
    One fused function on CPU (_RotaryNorm); elsewhere the two ops (CUDA's own norm kernel, or a compile's)."""
    if x.device.type == "cpu":
        return _RotaryNorm.apply(x, cos, sin, scale)
    return rms_norm(apply_rotary(x, cos, sin), scale)


class _RmsNorm(torch.autograd.Function):
    """y = scale * x / sqrt(mean(x^2) + eps) over the last dim, in fp32 (fp64 for fp64) with that type's eps:
    what F.rms_norm does by default (for bf16 input too, whose own eps, 2^-7, it does not use). Returns `copies`
    aliases of y, one per consumer, so that backward receives each consumer's gradient separately and sums them
    in fp32: eager autograd would add the bf16 gradients of an attention input's q, k, v projections and its
    value-embedding gate in bf16, rounding three times before the norm's backward (the compiled graph fuses that
    sum into the backward in fp32; the eager smear_lambda gradient was 2.4x the compiled one's error).

    On CPU, F.rms_norm's backward runs as a chain of elementwise ops (a profile of one fwd+bwd: 7 mul, 3 pow,
    7 copy, 3 sum, a div). Here forward is one row reduction and one scale (rounded once), backward with
    h = s r g (r = 1 / rms, s = scale, one pass that also upcasts a bf16 gradient):
        dx = h - x (r^2 / C) (h . x)           (x: the fp32 / fp64 input, kept when y is rounded to bf16)
        dx = h - y (1 / (s^2 C)) (h . y)       (y: the output, kept when it is as wide as the input)
    i.e. three passes where the textbook form makes seven.
    """

    @staticmethod
    def forward(ctx, x, scale: float, out_dtype: torch.dtype, copies: int, prefix: int):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        inv_rms = _inv_rms(xf)
        # bf16: computed in fp32 and rounded once (F.rms_norm(x) * scale rounds the normalised x, then the
        # scaled one: two roundings, as many as the QK-norm's whole gradient error budget)
        y = (xf * (inv_rms * scale)).to(out_dtype)
        # an fp32 stream normed into bf16 keeps its fp32 input: the backward's projection on the rounded output
        # would leave dx only approximately orthogonal to x, and the per-layer scalars' gradients are sums of
        # dx . x0 (x0 ~ a component of x) that cancel down to that approximation (x0_lambdas 2.3 % off, not 0.4 %)
        keeps_input = torch.finfo(out_dtype).bits < torch.finfo(xf.dtype).bits
        ctx.save_for_backward(x if keeps_input else y, inv_rms)
        ctx.scale, ctx.in_dtype, ctx.keeps_input = scale, x.dtype, keeps_input
        ctx.copies, ctx.prefix = copies, prefix
        ctx.set_materialize_grads(False)  # an unused alias sends None, not a zero tensor to add
        # distinct aliases (one tensor returned twice would be one output, its gradients summed by autograd)
        outs = [y, *(y.view_as(y) for _ in range(copies - 1))] + ([y[..., :prefix]] if prefix else [])
        return tuple(outs) if len(outs) > 1 else y

    @staticmethod
    def backward(ctx, *grads):
        saved, inv_rms = ctx.saved_tensors
        work, size = inv_rms.dtype, saved.size(-1)
        s_r = inv_rms * ctx.scale
        full = [g for g in grads[:ctx.copies] if g is not None]
        part = grads[ctx.copies] if ctx.prefix else None
        if full and full[0].dtype == work:                 # fp32 / fp64 model: h = s r g in one pass
            h = torch.mul(full[0], s_r)
            for g in full[1:]:
                h.addcmul_(g, s_r)
            if part is not None:
                h[..., :ctx.prefix].addcmul_(part, s_r)
        else:  # bf16 gradients: one upcast buffer (mixed-dtype CPU kernels measured 2.5x slower than same-dtype)
            h = full[0].to(work) if full else torch.zeros(saved.shape, dtype=work, device=saved.device)
            for g in full[1:]:
                h.add_(g)
            if part is not None:
                h[..., :ctx.prefix].add_(part)
            h.mul_(s_r)
        ref = saved.to(work)                               # no copy unless a bf16 output was kept
        dx = _remove_component(h, ref, inv_rms.square() / size if ctx.keeps_input
                               else 1.0 / (ctx.scale * ctx.scale * size))
        return dx.to(ctx.in_dtype), None, None, None, None


def rms_norm(x: torch.Tensor, scale: float = 1.0, out_dtype: torch.dtype | None = None, copies: int = 1,
             prefix: int = 0):
    """scale * F.rms_norm(x, (x.size(-1),)) in out_dtype (default x's). With copies > 1 or prefix > 0, a tuple:
    `copies` aliases of it, one per consumer, then (prefix > 0) a view of its first `prefix` channels for a
    consumer that reads only those; their gradients are summed in fp32 (see _RmsNorm).

    One fused autograd function on CPU, and in eager mode wherever one output has several consumers; otherwise
    PyTorch's kernel (CUDA has fused forward and backward kernels of its own, and a compiled graph sums the
    consumers' gradients inside its fused norm backward). An fp32 x normed into bf16 gets its gradient in fp32.
    """
    out_dtype = out_dtype or x.dtype
    if torch.is_grad_enabled() and x.requires_grad and (
            x.device.type == "cpu" or ((copies > 1 or prefix) and not torch.compiler.is_compiling())):
        return _RmsNorm.apply(x, scale, out_dtype, copies, prefix)
    y = F.rms_norm(x, (x.size(-1),))
    y = (y * scale if scale != 1.0 else y).to(out_dtype)
    outs = (y,) * copies + ((y[..., :prefix],) if prefix else ())
    return outs if len(outs) > 1 else y


@torch.library.custom_op("titanlite::embedding_row_grads", mutates_args=())
def embedding_row_grads(grad: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """d(loss)/d(table) of an embedding lookup: aten's own kernel, as eager autograd runs it. A custom op is
    opaque to inductor, which would otherwise lower it to an atomic scatter-add (see embedding)."""
    return torch.ops.aten.embedding_dense_backward(grad, idx, num_rows, -1, False)


@embedding_row_grads.register_fake
def _(grad, idx, num_rows):
    return grad.new_empty((num_rows, grad.size(-1)))


class _Embedding(torch.autograd.Function):
    """table[idx] whose backward is eager's fixed-order row sum even inside a compiled graph. Inductor's CPU
    backward of an embedding scatter-adds the row gradients with atomics across threads, so their summation
    order, and with it the weights, changed from run to run: under a whole-model compile a resumed run ended
    1e-7 away from the uninterrupted one in wte and the value embeddings (eager resumes bitwise)."""

    @staticmethod
    def forward(ctx, table, idx):
        ctx.save_for_backward(idx)
        ctx.num_rows = table.size(0)
        return F.embedding(idx, table)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return embedding_row_grads(grad.contiguous(), idx, ctx.num_rows), None


def embedding(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """F.embedding(idx, table); on CPU with a deterministic backward under torch.compile (_Embedding)."""
    if idx.device.type == "cpu" and torch.is_grad_enabled() and table.requires_grad:
        return _Embedding.apply(table, idx)
    return F.embedding(idx, table)


class _ReluSquared(torch.autograd.Function):
    """relu(x)^2 with gradient 2 relu(x) g: two passes each way (eager relu + square + threshold_backward
    is six, and relu^2 is a third of a small model's non-matmul time)."""

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return (r + r).mul_(grad)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return _ReluSquared.apply(x)


# ---- fused head: softcap + cross-entropy in row chunks -------------------------------------------------------
# The plain head materialises (tokens, vocab) fp32 logits several times over (matmul output, /c, tanh, *c,
# log-softmax, and as many tensors again in backward): at d4/T512/vocab 8192 that is 128 MiB per pass and about a
# quarter of a CPU step spent streaming memory. Here each chunk of rows goes matmul -> softcap -> logsumexp ->
# gradient while it is still in cache, and the gradient of the loss w.r.t. the head's input and weight is formed
# right away (the loss is a scalar, so backward only rescales it by grad_output). Same math, same matmul FLOPs.
# logits per chunk: on CPU 8 MiB of fp32 (256 rows at vocab 8192): smaller chunks starve the matmuls (the head's
# weight-gradient matmul has the chunk's rows as its inner dimension), larger ones fall out of the cache
HEAD_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 27}


# exp(-2c) stays a normal fp32 number (> 1e-38) up to c = 43
MAX_SHIFT_FREE_SOFTCAP = 40.0


def _head_chunk_rows(vocab: int, device_type: str) -> int:
    return max(1, HEAD_CHUNK_ELEMENTS.get(device_type, 1 << 24) // vocab)


# On CPU the chunk's logits are formed vocab-major, (vocab, rows) = W x^T: MKL runs that (8192 x 256) @ (256 x
# 256) matmul ~25% faster than the rows-major (256 x 256) @ (256 x 8192) one (7.6-7.9 vs 9.6-10.7 ms, AVX2, 2
# threads), and the weight gradient becomes the same fast shape; the whole head measured 5-10% faster. GPUs keep
# the rows-major layout (cuBLAS takes either; not measured there).
VOCAB_DIM = {"cpu": 0}


def _softcap_ce_chunk(x_c, w_v, tgt, softcap: float, want_grad: bool, vocab_dim: int = 1):
    """(loss per row with ignore_index -1 -> 0, fp32 grad of the logits or None) for one chunk of rows; the
    logits and their gradient are (rows, vocab) for vocab_dim 1, (vocab, rows) for vocab_dim 0.

    The softcap z = c tanh(l / c) is formed through one sigmoid, s = sigmoid(-2 l / c) = (1 - t) / 2 for
    t = tanh(l / c): z = c (1 - 2 s), z - c = -2 c s and dz/dl = 1 - t^2 = 4 s (1 - s). On CPU PyTorch's tanh
    costs 7-9x its sigmoid (3.8 vs 0.44 ms per 2M fp32 values, AVX-512, 2 threads), and tanh + exp were most of
    the head's non-matmul time. z never exceeds c, so exp(z - c) cannot overflow and logsumexp needs no max
    pass: lse = c + log(sum exp(z - c)); exp(z - c) is reused for the softmax. A cap so large that exp(-2c)
    underflows fp32 shifts by the row max instead.
    """
    d = vocab_dim
    work = torch.promote_types(x_c.dtype, torch.float32)  # fp32, or fp64 for a float64 reference
    valid = (tgt >= 0).to(work)
    tgt = tgt.clamp_min(0).unsqueeze(d)
    logits = torch.mm(w_v, x_c.t()) if d == 0 else torch.mm(x_c, w_v.t())
    s = logits.to(work).mul_(-2.0 / softcap).sigmoid_()      # s = (1 - t) / 2, kept for the gradient
    if softcap <= MAX_SHIFT_FREE_SOFTCAP:
        shift = torch.full_like(valid, softcap)
        shifted = torch.mul(s, -2.0 * softcap).exp_()         # exp(z - c), in [e^-2c, 1]
    else:  # z - max z = -2c (s - min s)
        s_min = s.amin(dim=d, keepdim=True)
        shift = softcap * (1.0 - 2.0 * s_min.squeeze(d))
        shifted = torch.sub(s, s_min).mul_(-2.0 * softcap).exp_()
    sum_exp = shifted.sum(dim=d)
    lse = sum_exp.log() + shift
    loss = (lse - softcap * (1.0 - 2.0 * s.gather(d, tgt).squeeze(d))) * valid
    if not want_grad:
        return loss, None
    four_valid = 4.0 * valid                                   # the 4 of 4 s (1 - s), folded into the row factor
    grad = shifted.mul_((four_valid / sum_exp).unsqueeze(d))  # 4 x softmax, zero on ignored rows
    grad.scatter_add_(d, tgt, -four_valid.unsqueeze(d))
    return loss, grad.mul_(s.addcmul_(s, s, value=-1.0))      # x s (1 - s): through the softcap


# Devices whose eager fused head runs each chunk's elementwise work (softcap, logsumexp, softmax gradient, the
# cast of that gradient to the compute dtype: ~10 passes over a 4096 x 32768 fp32 chunk) as one compiled kernel.
# On CUDA the model compiles per block and the head runs eagerly outside them; on CPU the head is either inside a
# whole-model compile already, or eager where a compile of its own measured no gain at d4.
COMPILED_HEAD_DEVICES = {"cuda"}
_compiled_chunk_kernel = None


def _chunk_loss_and_grad(x_c, w_v, tgt, softcap: float, vocab_dim: int, grad_dtype: torch.dtype):
    """(loss per row, gradient of the logits in grad_dtype) of one chunk."""
    loss, grad = _softcap_ce_chunk(x_c, w_v, tgt, softcap, want_grad=True, vocab_dim=vocab_dim)
    return loss, grad.to(grad_dtype)


def _chunk_kernel(device_type: str):
    global _compiled_chunk_kernel
    if device_type not in COMPILED_HEAD_DEVICES or torch.compiler.is_compiling():
        return _chunk_loss_and_grad
    if _compiled_chunk_kernel is None:  # shapes are fixed per run (plus one for a shorter last chunk)
        _compiled_chunk_kernel = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk_kernel


def _accumulate_weight_grad(acc: torch.Tensor, grad_t: torch.Tensor, x_c: torch.Tensor) -> None:
    """acc += grad_t @ x_c with fp32 accumulation. Low-precision operands: on CUDA the GEMM returns its fp32
    accumulator (mm with out_dtype; the in-place addmm out= variant does not run under FakeTensorMode, which the
    scale simulation uses) and that is added; CPU kernels have no such variant (aten::mm.dtype has no CPU
    kernel), so the chunk's partial is rounded to the compute dtype once before it is added: measured 0.27 % of
    the head's weight gradient at d4 shapes (8192 x 256, vocab 8192, 32 chunks), /tmp-free script in the note."""
    if grad_t.dtype == acc.dtype and x_c.dtype == acc.dtype:
        acc.addmm_(grad_t, x_c)
    elif acc.device.type == "cuda":
        acc.add_(torch.mm(grad_t, x_c, out_dtype=acc.dtype))
    else:
        acc.add_(torch.mm(grad_t, x_c))


class _FusedSoftcapCrossEntropy(torch.autograd.Function):
    """Summed loss over rows; forward also produces d(sum)/dx and d(sum)/dW (fp32 accumulation)."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap: float, vocab_size: int, chunk_rows: int, vocab_dim: int = 1):
        # narrow/split rather than [a:b] indexing, which fake CUDA tensors (the simulator's) do not support
        w_v = weight.narrow(0, 0, vocab_size)
        grad_x = torch.empty_like(x)
        work = torch.promote_types(x.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=work, device=weight.device)
        grad_w_v = grad_w.narrow(0, 0, vocab_size)
        total = torch.zeros((), dtype=work, device=x.device)
        chunk = _chunk_kernel(x.device.type)
        for x_c, tgt, grad_x_c in zip(x.split(chunk_rows), targets.split(chunk_rows), grad_x.split(chunk_rows)):
            loss, grad = chunk(x_c, w_v, tgt, softcap, vocab_dim, x.dtype)
            total += loss.sum()
            rows_major = grad if vocab_dim == 1 else grad.t()      # (rows, vocab) views of the logit gradient
            torch.mm(rows_major, w_v, out=grad_x_c)
            _accumulate_weight_grad(grad_w_v, rows_major.t(), x_c)
            del loss, grad, rows_major  # else this chunk's buffers live on through the next one's: 3 at peak, not 2
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_output.to(grad_w.dtype)  # e.g. 1 / tokens: applied unrounded, each result rounded once
        return ((grad_x.to(grad_w.dtype) * scale).to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype),
                None, None, None, None, None)


def softcapped_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                             vocab_size: int, reduction: str = "mean") -> torch.Tensor:
    """CE of softcap(x @ weight[:vocab].T) against targets (ignore_index -1), reduction "sum", "mean" or "none".

    "none" (per-token losses, 0 for ignored targets, shaped like targets) is for evaluation: it runs the same row
    chunks without a gradient, so val_bpb never holds more than a chunk of logits (the unfused path would hold
    several fp32 (tokens, vocab) copies: ~17 GB at d26, device batch 16, T 2048).
    """
    x2, t2 = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    chunk_rows = _head_chunk_rows(vocab_size, x.device.type)
    vocab_dim = VOCAB_DIM.get(x.device.type, 1)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad and reduction != "none":
        total = _FusedSoftcapCrossEntropy.apply(x2, weight, t2, softcap, vocab_size, chunk_rows, vocab_dim)
    elif needs_grad:
        raise ValueError("softcapped_cross_entropy(reduction='none') has no backward; run it under no_grad")
    else:
        w_v = weight.narrow(0, 0, vocab_size)
        losses = [_softcap_ce_chunk(x_c, w_v, t_c, softcap, want_grad=False, vocab_dim=vocab_dim)[0]
                  for x_c, t_c in zip(x2.split(chunk_rows), t2.split(chunk_rows))]
        if reduction == "none":
            return torch.cat(losses).reshape(targets.shape)
        total = sum(loss.sum() for loss in losses)
    if reduction == "sum":
        return total
    return total / (t2 >= 0).sum()  # mean over non-ignored tokens, like F.cross_entropy (no host sync)
