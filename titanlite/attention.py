"""Causal (sliding-window) attention behind one function, with the kernel chosen once at start.

Kernels, best first, each reached through a small loader whose failure falls through to the next with a reason:
FA3 from the kernel hub (the `kernels` package: prebuilt, no compiler), FA3 from a source build of flash-attn's
Hopper folder (`flash_attn_interface`), FA4 (`flash-attn-4`, CuTe DSL, no nvcc), flash-attn 2, flex_attention
with a sliding-window block mask, and PyTorch SDPA (is_causal; windows as banded query blocks, or an explicit
boolean mask for small windows and KV-cache decoding) as the last fallback.

Layout everywhere is (B, T, H, D). A window `w` means the query at position i sees keys j with
i - w <= j <= i, i.e. w + 1 keys (FA3's `window_size=(w, 0)`). With a KV cache the Tq queries are the last
Tq positions of the Tk keys, so the masks are offset by Tk - Tq.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titanlite.errors import UserError

BACKENDS = ("fa3", "fa4", "flash_attn", "flex", "sdpa")

# The reference trainer (nanochat, nanochat/flash_attention.py) loads FA3 with `kernels.get_kernel(...)
# .flash_attn_interface`: from "varunneal/flash-attention-3" on Hopper and "kernels-community/flash-attn3" on
# other GPUs. We take the kernels-community build everywhere: `kernels` >= 0.14 refuses repositories of
# publishers the hub does not mark as trusted unless called with trust_remote_code=True, and a trainer should
# not silently run native code from a personal repository. The same FA3 source, the same call.
FA3_HUB_REPO = "kernels-community/flash-attn3"
FA3_HUB_REVISION = "main"  # `kernels` >= 0.16 wants a revision or version; "main" is what older ones default to
# The hub is asked first whether a build exists for this torch/CUDA (a small metadata request): a machine
# without a network answers that with an error or not at all, and either way we move on after this long.
HUB_PROBE_TIMEOUT_S = 10.0
# Downloading the build itself (hundreds of MB, once per machine: it is cached) gets longer.
HUB_DOWNLOAD_TIMEOUT_S = 300.0

# flash-attn-4 (PyPI `flash-attn-4`, module flash_attn.cute) was checked in its source (flash_attn/cute/
# interface.py, 2026-08): `flash_attn_func(q, k, v, causal=True, window_size=(w, 0))` resolves to its "local"
# mask with left window w and right 0 (causal), forward and backward, aligned bottom-right when Tq < Tk like
# FA2/FA3; it returns (out, lse). It targets Hopper and Blackwell, so it is tried after FA3 and needs sm90+.
FA4_MIN_CAPABILITY = 9


def _cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# loaders: each returns (flash_attn_func, "") or (None, why not); imported lazily so a CPU box never pays for them

def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def _call_with_deadline(fn: Callable, seconds: float):
    """(result, error, timed_out) of fn() run in a daemon thread; a call past its deadline is abandoned."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as error:  # noqa: BLE001 - reported to the caller as the reason
            box["error"] = error

    thread = threading.Thread(target=run, name="titanlite-kernel-hub", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return None, None, True
    return box.get("result"), box.get("error"), False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_fa3_hub(probe: bool = True):
    """probe=False skips the has_kernel question: another rank already found the build (kernel_choice)."""
    try:
        kernels = importlib.import_module("kernels")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None, "the kernels package is not installed (pip install -e '.[gpu]')"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    offline = _hub_offline()
    has_kernel = getattr(kernels, "has_kernel", None)
    if has_kernel is not None and not offline and probe:
        found, error, timed_out = _call_with_deadline(
            lambda: has_kernel(FA3_HUB_REPO, revision=FA3_HUB_REVISION), HUB_PROBE_TIMEOUT_S)
        if timed_out:
            return None, f"kernel hub unreachable (no answer within {HUB_PROBE_TIMEOUT_S:g} s)"
        if error is not None:
            return None, f"kernel hub unreachable ({_first_line(error)})"
        if not found:
            return None, f"the kernel hub has no {FA3_HUB_REPO} build for torch {torch.__version__}"
    module, error, timed_out = _call_with_deadline(
        lambda: kernels.get_kernel(FA3_HUB_REPO, revision=FA3_HUB_REVISION), HUB_DOWNLOAD_TIMEOUT_S)
    if timed_out:
        return None, f"kernel hub download of {FA3_HUB_REPO} took over {HUB_DOWNLOAD_TIMEOUT_S:g} s"
    if error is not None:
        if offline:
            return None, f"HF_HUB_OFFLINE is set and {FA3_HUB_REPO} is not in the local cache"
        return None, f"kernel hub unreachable ({_first_line(error)})"
    interface = getattr(module, "flash_attn_interface", module)
    fn = getattr(interface, "flash_attn_func", None)
    return (fn, "") if fn is not None else (None, f"{FA3_HUB_REPO} has no flash_attn_func")


def _import_function(module: str, attr: str, missing: str):
    try:
        return getattr(importlib.import_module(module), attr), ""
    except Exception:  # noqa: BLE001 - a broken build is as unusable as a missing one
        return None, missing


def _load_fa3_interface():
    return _import_function("flash_attn_interface", "flash_attn_func",
                            "flash_attn_interface is not installed (a source build of flash-attn's hopper/)")


def _load_fa4():
    return _import_function("flash_attn.cute", "flash_attn_func", "flash-attn-4 is not installed")


def _load_fa2():
    return _import_function("flash_attn", "flash_attn_func", "flash-attn 2 is not installed (needs nvcc to build)")


# ---------------------------------------------------------------------------------------------------------------
# the chain

def _needs_gpu(min_major: int, max_major: int | None, gpu_text: str, half: bool):
    def check(device_type: str, dtype: torch.dtype) -> str:
        if device_type != "cuda":
            return "no CUDA GPU"
        major = _cuda_capability()[0]
        if major < min_major or (max_major is not None and major > max_major):
            return f"needs {gpu_text} (this GPU is sm{major}x)"
        if half and not _is_half(dtype):
            return "needs bfloat16 compute (training.dtype)"
        return ""
    return check


def _flex_needs(device_type: str, dtype: torch.dtype) -> str:
    return "" if device_type == "cuda" else f"no backward on {device_type} in this PyTorch (forward only)"


@dataclass(frozen=True)
class Candidate:
    backend: str   # the name attention() runs it under
    label: str     # how the start-up line names it
    needs: Callable[[str, torch.dtype], str]  # "" when this device and dtype can run it, else why not
    load: Callable[..., tuple] | None         # () -> (flash_attn_func, "") or (None, why not)
    probes: bool = False                      # load takes probe=: whether to ask a remote first (the hub)


CHAIN = (
    Candidate("fa3", "FA3 (kernel hub)", _needs_gpu(9, 9, "a Hopper GPU", True), _load_fa3_hub, probes=True),
    Candidate("fa3", "FA3 (flash_attn_interface)", _needs_gpu(9, 9, "a Hopper GPU", True), _load_fa3_interface),
    Candidate("fa4", "FA4 (flash-attn-4)", _needs_gpu(FA4_MIN_CAPABILITY, None, "a Hopper or Blackwell GPU", True),
              _load_fa4),
    Candidate("flash_attn", "flash-attn 2", _needs_gpu(8, None, "an Ampere-or-newer GPU", True), _load_fa2),
    Candidate("flex", "flex_attention", _flex_needs, None),
    Candidate("sdpa", "SDPA", lambda device_type, dtype: "", None),
)

_LOADED: dict[str, tuple] = {}          # label -> (fn, reason): each loader runs once per process
_KERNELS: dict[str, Callable] = {}      # backend -> the flash_attn_func attention() calls
_SOURCES: dict[str, str] = {}           # backend -> label of the loader that provided it


def reset_kernels() -> None:
    """Forget every loader's result (tests stub the imports and load again)."""
    _LOADED.clear()
    _KERNELS.clear()
    _SOURCES.clear()


def _try(candidate: Candidate, device_type: str, dtype: torch.dtype, probe: bool = True) -> str:
    """"" when `candidate` can run here (its kernel is then registered for attention()), else why not."""
    why = candidate.needs(device_type, dtype)
    if why or candidate.load is None:
        return why
    if candidate.label not in _LOADED:
        _LOADED[candidate.label] = candidate.load(probe=probe) if candidate.probes else candidate.load()
    fn, why = _LOADED[candidate.label]
    if fn is not None and candidate.backend not in _KERNELS:
        _KERNELS[candidate.backend] = fn
        _SOURCES[candidate.backend] = candidate.label
    return why


def backend_available(name: str, device_type: str, dtype: torch.dtype) -> tuple[bool, str]:
    """(usable for training, reason if not) for one backend on this device/dtype."""
    if name not in BACKENDS:
        raise UserError(f"model.attention_backend = {name!r} is unknown; choose one of auto, {', '.join(BACKENDS)}")
    reasons = []
    for candidate in CHAIN:
        if candidate.backend == name:
            why = _try(candidate, device_type, dtype)
            if not why:
                return True, ""
            reasons.append(f"{candidate.label}: {why}")
    return False, "; ".join(reasons)


def chosen_label(backend: str) -> str:
    """The chain entry that provides `backend` in this process (after select_attention_backend chose it)."""
    return _SOURCES.get(backend) or next(c.label for c in CHAIN if c.backend == backend)


def load_chosen(label: str, device_type: str, dtype: torch.dtype) -> str:
    """Load exactly the chain entry `label` (another rank's choice), with no fallthrough and no remote probe;
    "" when it runs here (its kernel is registered for attention()), else why not."""
    candidate = next((c for c in CHAIN if c.label == label), None)
    if candidate is None:
        return f"{label!r} is not an attention kernel this titanlite knows"
    if _SOURCES.get(candidate.backend) not in (None, label):
        _KERNELS.pop(candidate.backend)  # the same backend from another loader: take the chosen one
        _SOURCES.pop(candidate.backend)
    return _try(candidate, device_type, dtype, probe=False)


def _grouped(skipped: list[tuple[str, str]]) -> str:
    """'a, b: same reason; c: other reason' (neighbours with one reason share it)."""
    groups: list[tuple[list[str], str]] = []
    for label, why in skipped:
        if groups and groups[-1][1] == why:
            groups[-1][0].append(label)
        else:
            groups.append(([label], why))
    return "; ".join(f"{', '.join(labels)}: {why}" for labels, why in groups)


_FALLBACK_TEXT = {
    "fa4": "using Flash Attention 4 (flash-attn-4)",
    "flash_attn": "using Flash Attention 2 (flash-attn)",
    "flex": "using flex_attention with a sliding-window block mask",
    "sdpa": "using PyTorch SDPA fallback",
}


def select_attention_backend(requested: str, device_type: str, dtype: torch.dtype,
                             window_pattern: str) -> tuple[str, list[str]]:
    """Pick the kernel once at start; return it with the status lines the trainer prints.

    `requested` is `model.attention_backend`; a forced backend that cannot run here is a UserError. The first
    line names the kernel that runs and, after "Skipped:", why each better one did not.
    """
    has_short = "S" in window_pattern.upper()
    if requested != "auto":
        ok, why = backend_available(requested, device_type, dtype)
        if not ok:
            raise UserError(f"model.attention_backend = {requested!r} is not available here: {why}; "
                            f"use model.attention_backend = \"auto\" (or sdpa)")
        name, skipped = requested, []
    else:
        name, skipped = "sdpa", []
        for candidate in CHAIN:
            if candidate.backend == "flex" and not has_short:
                why = "not needed without short windows (SDPA's causal kernel covers full context)"
            else:
                why = _try(candidate, device_type, dtype)
            if not why:
                name = candidate.backend
                break
            skipped.append((candidate.label, why))
    tail = f" Skipped: {_grouped(skipped)}." if skipped else ""
    if name == "fa3":
        lines = [f"✓ Using Flash Attention 3 (Hopper GPU detected), efficient, new and awesome. "
                 f"[{_SOURCES['fa3']}]{tail}"]
    else:
        lines = [f"WARNING: Flash Attention 3 not available, {_FALLBACK_TEXT[name]}. "
                 f"Training will be less efficient.{tail}"]
    if name == "sdpa" and has_short and device_type == "cpu":  # the seed's GPU warning does not apply here
        lines.append(f"Attention on CPU: SDPA runs the sliding-window layers (pattern {window_pattern}) as banded "
                     f"query blocks, each scoring only the keys of its window (windows of {MIN_BANDED_WINDOW}+ "
                     "tokens that fit twice in the context; smaller ones with a mask), and full-context layers "
                     "with SDPA's causal kernel")
    elif name == "sdpa" and has_short:
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


def _build_flex_mask(t: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=t, KV_LEN=t, device=device)


@functools.lru_cache(maxsize=64)
def flex_block_mask(t: int, window: int, device: torch.device):
    """The sliding-window causal BlockMask over t positions, built once per (t, window, device).

    Call it outside compiled code and pass the mask in (`attention(..., block_mask=...)`): Dynamo ignores
    lru_cache, so a mask looked up inside a compiled block would be rebuilt in the graph on every call.
    """
    return _build_flex_mask(t, window, torch.device(device))


def attention_masks(backend: str, t: int, windows, device: torch.device) -> dict | None:
    """{window: BlockMask} for the flex backend over t positions (None for the others, which need none)."""
    if backend != "flex":
        return None
    # a window of t - 1 or more is plain causal attention: one mask for all of them
    return {w: flex_block_mask(t, min(w, t - 1), torch.device(device)) for w in sorted(set(windows))}


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # compiled once per process; eager flex on GPU is a slow reference implementation
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, window: int, block_mask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if block_mask is None:  # a caller that built no masks (tests, one-off evaluation): correct, not fast
        build = flex_block_mask.__wrapped__ if torch.compiler.is_compiling() else flex_block_mask
        block_mask = build(q.size(1), min(window, q.size(1) - 1), q.device)
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        # inside a compiled block Dynamo lowers flex_attention itself (a compiled wrapper here would be a
        # compile inside a compile); on CPU eager flex is the only flex there is
        fn = flex_attention
    else:
        fn = _compiled_flex()
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    y = fn(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


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
    b = window
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


# CPU SDPA (flash_attention_for_cpu) scores a block of queries against key blocks of 512 and skips only key blocks
# wholly in the queries' future: up to T = 512 causal attention costs what full attention does. Run as two query
# halves, the first causal over the first half of the keys, the second against all keys with the bottom-right
# causal mask, it does 3/4 of the scores. Measured fwd+bwd per layer (B T = 8192, 2 heads of 128, 2 threads,
# AVX-512 bf16): T=512 83 -> 68 ms bf16, 95 -> 78 ms fp32; T=384 65 -> 56 / 71 -> 61 ms; T=256 about even; T >= 768
# slower (the kernel's own block skipping already saves a quarter there). GPUs have causal kernels of their own.
CPU_CAUSAL_HALVES = (384, 512)


def uses_causal_halves(t: int, device_type: str) -> bool:
    """True when full-context causal attention over t positions runs as two query halves (CPU, see above)."""
    return device_type == "cpu" and CPU_CAUSAL_HALVES[0] <= t <= CPU_CAUSAL_HALVES[1]


def _sdpa_causal_halves(q, k, v, gqa: bool) -> torch.Tensor:
    """Causal attention on (B, H, T, D) as two query halves; returns (B, H, T, D)."""
    t = q.size(2)
    h = t // 2
    first = F.scaled_dot_product_attention(q[:, :, :h], k[:, :, :h], v[:, :, :h], is_causal=True,
                                           enable_gqa=gqa)
    second = F.scaled_dot_product_attention(q[:, :, h:], k, v, attn_mask=_window_mask(t - h, t, t, q.device),
                                            enable_gqa=gqa)
    return torch.cat([first, second], dim=2)


def _sdpa(q, k, v, window: int) -> torch.Tensor:
    t_q, t_k = q.size(1), k.size(1)
    gqa = q.size(2) != k.size(2)
    if t_q == t_k and uses_banded_sdpa(t_q, window):
        return _sdpa_banded(q, k, v, window, gqa)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if t_q == t_k and window >= t_q - 1 and uses_causal_halves(t_q, q.device.type):
        y = _sdpa_causal_halves(q, k, v, gqa)
    elif t_q == t_k and window >= t_q - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif t_q == 1 and window >= t_k - 1:  # one decoding query sees the whole cache
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(t_q, t_k, window, q.device),
                                           enable_gqa=gqa)
    return y.transpose(1, 2)


def _flash(fn, q, k, v, window: int) -> torch.Tensor:
    # flash-attn aligns causal/window masks bottom-right when Tq < Tk, which is exactly the KV-cache layout
    out = fn(q, k, v, causal=True, window_size=(window, 0))
    return out[0] if isinstance(out, tuple) else out  # FA3/FA4 builds may also return the log-sum-exp


def _kernel(backend: str) -> Callable:
    fn = _KERNELS.get(backend)
    if fn is None:  # set_attention_backend without select_attention_backend (tests, exported models)
        ok, why = backend_available(backend, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
        if not ok:
            raise UserError(f"attention backend {backend!r} cannot run here: {why}")
        fn = _KERNELS[backend]
    return fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
              backend: str = "sdpa", block_mask=None) -> torch.Tensor:
    """Causal attention where each query sees itself and the `window` keys before it.

    q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with Tk >= Tq (KV cache: queries are the last Tq positions).
    Softmax scale is the default 1/sqrt(D). Returns (B, Tq, H, D). `block_mask`: the flex backend's mask for
    this (T, window), from `attention_masks` outside compiled code.
    """
    if backend in ("fa3", "fa4", "flash_attn"):
        return _flash(_kernel(backend), q, k, v, window)
    if backend == "flex" and q.size(1) == k.size(1):
        return _flex(q, k, v, window, block_mask)
    # flex with a KV cache decodes through SDPA: a block mask per new (Tq, Tk) would cost more than the attention
    return _sdpa(q, k, v, window)
