"""Causal (sliding-window) attention behind one function, with the kernel chosen once at start.

Backends, best first: FA3 (flash-attn's Hopper interface), flash-attn 2, flex_attention with a sliding-window
block mask, and PyTorch SDPA (is_causal; windows as banded query blocks, or an explicit boolean mask for small
windows and KV-cache decoding) as the last fallback.

Layout everywhere is (B, T, H, D). A window `w` means the query at position i sees keys j with
i - w <= j <= i, i.e. w + 1 keys (FA3's `window_size=(w, 0)`). With a KV cache the Tq queries are the last
Tq positions of the Tk keys, so the masks are offset by Tk - Tq.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from titanlite.errors import UserError

BACKENDS = ("fa3", "flash_attn", "flex", "sdpa")


# ---------------------------------------------------------------------------------------------------------------
# optional kernels (imported lazily: a CPU box must never pay for, or fail on, these imports)

@functools.lru_cache(maxsize=None)
def _fa3_func():
    try:
        from flash_attn_interface import flash_attn_func  # flash-attn's Hopper build ("FA3")
    except Exception:
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=None)
def _fa2_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return None
    return flash_attn_func


def _cuda_major() -> int:
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


def backend_available(name: str, device_type: str, dtype: torch.dtype) -> tuple[bool, str]:
    """(usable for training, reason if not) for one backend on this device/dtype."""
    half = dtype in (torch.bfloat16, torch.float16)
    if name == "fa3":
        if device_type != "cuda" or _cuda_major() != 9:
            return False, "needs a Hopper GPU (compute capability 9.x)"
        if _fa3_func() is None:
            return False, "the flash-attn Hopper package (flash_attn_interface) is not installed"
        return (True, "") if half else (False, "needs bfloat16 compute (training.dtype)")
    if name == "flash_attn":
        if device_type != "cuda" or _cuda_major() < 8:
            return False, "needs an Ampere-or-newer CUDA GPU"
        if _fa2_func() is None:
            return False, "the flash-attn package is not installed (pip install flash-attn)"
        return (True, "") if half else (False, "needs bfloat16 compute (training.dtype)")
    if name == "flex":
        if device_type != "cuda":
            return False, f"flex_attention has no backward on {device_type} in this PyTorch (forward only)"
        return True, ""
    if name == "sdpa":
        return True, ""
    raise UserError(f"model.attention_backend = {name!r} is unknown; choose one of auto, {', '.join(BACKENDS)}")


_FALLBACK_TEXT = {
    "flash_attn": "using Flash Attention 2 (flash-attn)",
    "flex": "using flex_attention with a sliding-window block mask",
    "sdpa": "using PyTorch SDPA fallback",
}


def select_attention_backend(requested: str, device_type: str, dtype: torch.dtype,
                             window_pattern: str) -> tuple[str, list[str]]:
    """Pick the kernel once at start; return it with the status lines the trainer prints.

    `requested` is `model.attention_backend`; a forced backend that cannot run here is a UserError.
    """
    has_short = "S" in window_pattern.upper()
    if requested == "auto":
        order = ["fa3", "flash_attn"] + (["flex"] if has_short else []) + ["sdpa"]
        name = next(n for n in order if backend_available(n, device_type, dtype)[0])
    else:
        ok, why = backend_available(requested, device_type, dtype)
        if not ok:
            raise UserError(f"model.attention_backend = {requested!r} is not available here: {why}; "
                            f"use model.attention_backend = \"auto\" (or sdpa)")
        name = requested
    if name == "fa3":
        lines = ["✓ Using Flash Attention 3 (Hopper GPU detected), efficient, new and awesome."]
    else:
        lines = [f"WARNING: Flash Attention 3 not available, {_FALLBACK_TEXT[name]}. "
                 "Training will be less efficient."]
    if name == "sdpa" and has_short:
        lines.append(f"WARNING: SDPA has no support for sliding window attention (pattern {window_pattern}); "
                     "falling back to a masked path. GPU utilization will be terrible. Use --window-pattern L "
                     "(model.window_pattern = \"L\") for full context attention without Flash Attention 3.")
    return name, lines


# ---------------------------------------------------------------------------------------------------------------
# masks (cached: building them per call would dominate small steps)

@functools.lru_cache(maxsize=256)
def window_mask(t_q: int, t_k: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = may attend; queries sit at positions Tk-Tq .. Tk-1."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device).unsqueeze(1)
    k_pos = torch.arange(t_k, device=device).unsqueeze(0)
    return (k_pos <= q_pos) & (q_pos - k_pos <= window)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(t_q: int, t_k: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = t_k - t_q

    def sliding_causal(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (kv_idx <= q_pos) & (q_pos - kv_idx <= window)

    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=t_q, KV_LEN=t_k, device=device)


@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # eager flex is a slow reference implementation on GPU; the compiled one is the fused kernel
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


# ---------------------------------------------------------------------------------------------------------------

# Sliding windows through SDPA: a (T, T) mask makes the kernel score every query against every key, 4x the
# work a quarter-context window needs. Cut the queries into blocks of `window` rows; block i only needs the keys
# [(i-1) w, (i+1) w), so one batched SDPA over the blocks with a shared (w, 2w) band mask does 2 T w scores
# instead of T^2 (measured on CPU at T=512, w=128: 94 vs 141 ms forward+backward per layer). Worth it while the
# band is at most half the sequence; tiny windows stay on the plain mask.
MIN_BANDED_WINDOW = 16


def _window_mask(t_q: int, t_k: int, window: int, device: torch.device) -> torch.Tensor:
    # under torch.compile the mask is traced into the graph (dynamo ignores lru_cache anyway)
    build = window_mask.__wrapped__ if torch.compiler.is_compiling() else window_mask
    return build(t_q, t_k, window, device)


def uses_banded_sdpa(t: int, window: int) -> bool:
    """True when a window of this size over t positions runs as banded query blocks (implies window < t - 1)."""
    return window >= MIN_BANDED_WINDOW and 2 * window <= t


def _sdpa_banded(q, k, v, window: int, gqa: bool) -> torch.Tensor:
    """Causal sliding-window attention on (B, T, H, D) by query blocks of `window` rows; returns (B, T, H, D)."""
    B, T, H, D = q.shape
    Hkv, b = k.size(2), window
    n = -(-T // b)
    if n * b != T:  # pad the end: padded keys lie in every real query's future, so they are never seen
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, n * b - T)) for x in (q, k, v))
    first = F.scaled_dot_product_attention(*(x[:, :b].transpose(1, 2) for x in (q, k, v)), is_causal=True,
                                           enable_gqa=gqa).transpose(1, 2)

    def bands(x):  # (B, n b, h, D) -> (B, (n-1) h, 2b, D): block i+1's band = blocks i and i+1, block-major
        blocks = x.reshape(B, n, b, x.size(2), D).transpose(2, 3)  # (B, n, h, b, D), a view
        return torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=3).view(B, (n - 1) * x.size(2), 2 * b, D)

    # block-major (block, head) order keeps GQA's query-head -> kv-head grouping intact
    rest_q = q[:, b:].reshape(B, n - 1, b, H, D).transpose(2, 3).reshape(B, (n - 1) * H, b, D)
    # every block sees its band like the last b of 2b positions see a window of b
    band_mask = _window_mask(b, 2 * b, b, q.device)
    rest = F.scaled_dot_product_attention(rest_q, bands(k), bands(v), attn_mask=band_mask, enable_gqa=gqa)
    rest = rest.reshape(B, n - 1, H, b, D).transpose(2, 3).reshape(B, (n - 1) * b, H, D)
    return torch.cat([first, rest], dim=1)[:, :T]


def _sdpa(q, k, v, window: int) -> torch.Tensor:
    t_q, t_k = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    if t_q == t_k and uses_banded_sdpa(t_q, window):
        return _sdpa_banded(q, k, v, window, gqa)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if t_q == t_k and window >= t_q - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif t_q == 1 and window >= t_k - 1:  # one decoding query sees the whole cache
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(t_q, t_k, window, q.device),
                                           enable_gqa=gqa)
    return y.transpose(1, 2)


def _flex(q, k, v, window: int) -> torch.Tensor:
    t_q, t_k = q.size(1), k.size(1)
    block_mask = _flex_block_mask(t_q, t_k, window, q.device)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    y = _flex_fn(q.device.type)(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


def _flash(fn, q, k, v, window: int) -> torch.Tensor:
    # flash-attn aligns causal/window masks bottom-right when Tq < Tk, which is exactly the KV-cache layout
    out = fn(q, k, v, causal=True, window_size=(window, 0))
    return out[0] if isinstance(out, tuple) else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              backend: str = "sdpa") -> torch.Tensor:
    """Causal attention where each query sees itself and the `window` keys before it.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Tk >= Tq (KV cache: queries are the last Tq positions).
    Softmax scale is the default 1/sqrt(D). Returns (B, Tq, H, D).
    """
    if backend == "fa3":
        return _flash(_fa3_func(), q, k, v, window)
    if backend == "flash_attn":
        return _flash(_fa2_func(), q, k, v, window)
    if backend == "flex":
        return _flex(q, k, v, window)
    return _sdpa(q, k, v, window)
