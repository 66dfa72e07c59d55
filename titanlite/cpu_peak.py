"""The CPU matmul peak that MFU is measured against: measured once per (CPU, dtype, threads), then cached.

A single timed matmul taken while anything else runs can read 3x low (2-core machines share their cores with
every other process), which made the printed MFU move 2x between otherwise identical runs. So the peak is the
best of several short trials after a warm-up, and it is kept in `<cache>/cpu_peak_flops.json` so later runs on
the same machine divide by the same number. `metrics.peak_flops` sets it by hand; `metrics.remeasure_peak`
measures again and replaces the cached value.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from titanlite.paths import cache_dir

MATMUL_SIZE = 2048
TRIALS = 5
CACHE_FILE = "cpu_peak_flops.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def measure_matmul_peak(dtype: torch.dtype, size: int = MATMUL_SIZE, trials: int = TRIALS) -> float:
    """FLOP/s of a size x size matmul with the current thread count: the best of `trials` after a warm-up.

    The best, not the mean: background load only ever slows a trial down, so the fastest is the closest to
    what the machine can do.
    """
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):  # warm-up: kernel selection, page faults of the output, CPU frequency ramp
        torch.mm(a, b)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


@dataclass(frozen=True)
class CpuPeak:
    flops: float
    source: str  # where the number came from, for the device line


def _cache_key(dtype: torch.dtype, threads: int) -> str:
    return f"{cpu_name()} | {str(dtype).removeprefix('torch.')} | {threads} threads"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or damaged: measure again, the file is only a cache
        return {}


def _write_cache(path: Path, entries: dict) -> bool:
    """Atomic replace, so two processes starting together never leave a half-written file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return True
    except OSError:  # a read-only cache folder costs a re-measurement next time, nothing more
        return False


def cpu_peak_flops(dtype: torch.dtype, override: float = 0.0, remeasure: bool = False,
                   cache: Path | None = None) -> CpuPeak:
    if override > 0:
        return CpuPeak(override, "set by metrics.peak_flops")
    path = cache or cache_dir() / CACHE_FILE
    key = _cache_key(dtype, torch.get_num_threads())
    entries = _read_cache(path)
    cached = entries.get(key)
    if not remeasure and isinstance(cached, (int, float)) and cached > 0:
        return CpuPeak(float(cached), f"cached in {path}; --metrics.remeasure_peak=true to measure again")
    flops = measure_matmul_peak(dtype)
    entries[key] = flops
    where = f"saved to {path}" if _write_cache(path, entries) else "not cached: the cache folder is not writable"
    return CpuPeak(flops, f"measured now, best of {TRIALS} {MATMUL_SIZE}x{MATMUL_SIZE} matmuls; {where}")
