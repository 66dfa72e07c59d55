"""Device choice (`training.device_type`) and the one-line out-of-memory advice."""

from __future__ import annotations

import os

import torch

from titanlite.errors import UserError


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device_type(requested: str) -> str:
    """'' or 'auto' picks cuda > mps > cpu; an explicit device that is not there is an error, not a fallback."""
    if requested in ("", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("training.device_type = 'cuda' but no CUDA GPU is visible (torch.cuda.is_available() is "
                        "False); use --training.device_type=cpu, or install a CUDA build of torch")
    if requested == "mps" and not _mps_available():
        raise UserError("training.device_type = 'mps' but the Apple MPS backend is not available here; "
                        "use --training.device_type=cpu")
    return requested


def device_for_rank(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device_type)


def prepare_backend(device_type: str) -> None:
    """Allocator and matmul settings the recipe relies on; set before the first CUDA allocation."""
    if device_type == "cuda":
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == "cpu":
        keep_cpu_allocations_mapped()


# glibc hands every allocation above its mmap threshold straight back to the kernel on free, so each training
# step page-faults its activations in again (measured on the debug config: 20k faults, 80 MB, per step and about
# 4% of it). 32 MiB is the largest threshold glibc accepts; a large trim threshold keeps the freed heap top.
CPU_MMAP_THRESHOLD = 32 << 20
CPU_TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_cpu_allocations_mapped() -> bool:
    """Tune glibc malloc for step-after-step tensors of the same sizes; True if applied. No-op off glibc, and
    when the user set MALLOC_MMAP_THRESHOLD_ themselves."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, CPU_TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                              or "can't allocate memory" in str(exc).lower())


def out_of_memory_message(device_batch_size: int, device: torch.device, simulated: dict | None = None,
                          simulate_command: str = "") -> str:
    """simulated: {"none": batch, "full": batch} that `python -m titanlite.plan --simulate` found to fit this
    model, world size and GPU (None where nothing fits); simulate_command: how to find them where not known."""
    prefix = f"out of memory on {device} at training.device_batch_size={device_batch_size}: "
    if simulated:
        plain, full = simulated.get("none"), simulated.get("full")
        if plain and plain < device_batch_size:
            extra = f" ({full} with --activation_checkpoint.mode=full)" if full and full > plain else ""
            return prefix + f"the simulation says --training.device_batch_size={plain} fits{extra}"
        if full:
            return prefix + (f"the simulation says --training.device_batch_size={full} "
                             "--activation_checkpoint.mode=full fits")
        return prefix + "the simulation found no device batch that fits: use a smaller model (--model.depth)"
    smaller = 1 << max(0, (device_batch_size - 1).bit_length() - 1)  # next power of two below
    if smaller >= device_batch_size:
        smaller = device_batch_size // 2
    advice = (f"reduce it, e.g. --training.device_batch_size={smaller} (the total batch is kept by gradient "
              f"accumulation)" if smaller >= 1 else "use a smaller model (--model.depth) or a shorter context")
    if simulate_command:
        advice += f"; `{simulate_command}` finds the largest that fits"
    return prefix + advice
