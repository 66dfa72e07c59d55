"""Compute-dtype choice: fp32 master weights always; bf16 matmuls where the hardware runs them natively."""

from __future__ import annotations

import torch

from titanlite.cpu_peak import cpu_flags
from titanlite.errors import UserError

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 dot-product instructions (AVX512-BF16 or AMX); False off Linux."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def has_native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return False  # mps and anything else: stay in fp32 like the reference


def resolve_compute_dtype(requested: str, device_type: str) -> torch.dtype:
    """`training.dtype` -> the dtype activations and matmuls run in.

    auto: bf16 on CUDA SM80+ and on CPUs with avx512_bf16/amx_bf16, else fp32. An explicit choice is honoured
    (bf16 on hardware without native support is slow but correct).
    """
    if requested == "auto":
        return torch.bfloat16 if has_native_bf16(device_type) else torch.float32
    if requested not in _DTYPES:
        raise UserError(f"training.dtype = {requested!r} is not supported; use auto, bfloat16 or float32")
    return _DTYPES[requested]


def describe_compute_dtype(dtype: torch.dtype, device_type: str) -> str:
    """The start-up line saying which precision was chosen and why."""
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    native = has_native_bf16(device_type)
    why = "native bf16 on this hardware" if native else "no native bf16 on this hardware"
    return f"Compute dtype: {name} (fp32 master weights; {why})"
