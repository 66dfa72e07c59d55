"""The CPU matmul peak that MFU is measured against: measured once per (CPU, dtype, threads), then cached.

On these shared 2-core machines a 2048 x 2048 fp32 matmul, timed back to back with nothing else running, reads
anywhere from 0.7e11 to 1.6e11 FLOP/s (the hypervisor's neighbours), and a measurement taken while another
process computes reads 4x low: cached, that one number made every later MFU print 4x too high. So:
- the peak is the fastest of many short trials spread over a second or more (load only ever slows a trial down,
  so the fastest is the closest to what the machine can do);
- the CPU time other processes (and the hypervisor, as steal) took during the trials is read from /proc/stat;
  a measurement taken while they held more than a quarter of the cores is used for this run only, never cached,
  and the device line says so;
- a clean measurement is kept in `<cache>/cpu_peak_flops.json`, keyed by CPU model, instruction set, dtype and
  thread count, so later runs divide by the same number. `metrics.peak_flops` sets it by hand;
  `metrics.remeasure_peak` measures again and replaces the cached value.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from titanlite.paths import cache_dir

MATMUL_SIZE = 2048  # the largest size tried; smaller where one matmul of it would take too long
SMALLEST_SIZE = 256
SLOW_MATMUL_SECONDS = 0.02  # sizes double up to MATMUL_SIZE while one matmul takes less than this
MIN_TRIALS = 7
MIN_TRIAL_SECONDS = 1.5  # trials go on at least this long: a slow second from a neighbour does not decide it
MAX_TRIALS = 200
# share of all cores' time that other processes (or steal) may take during the trials for the number to be cached
BUSY_ELSEWHERE_LIMIT = 0.25
MIN_LOAD_WINDOW_SECONDS = 0.25  # /proc/stat counts in 10 ms ticks: a shorter window cannot tell load from noise
CACHE_FILE = "cpu_peak_flops.json"
# most capable first: the matmul kernels PyTorch picks differ by these, so the cache key names the best present
ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa() -> str:
    """The most capable matmul instruction set the CPU advertises ('avx2', 'avx512_bf16', ...)."""
    flags = cpu_flags()
    if not flags:
        return "unknown"
    return next((f for f in ISA_FLAGS if f in flags), "baseline")


def pick_matmul_size(dtype: torch.dtype, largest: int = MATMUL_SIZE) -> int:
    """The size the peak is measured at: `largest`, or smaller where the CPU only emulates the dtype (bf16
    without avx512_bf16 runs at ~1 GFLOP/s, so one 2048 x 2048 matmul would take 20 s)."""
    size = min(SMALLEST_SIZE, largest)
    while size < largest:
        a = torch.randn(size, size).to(dtype)
        torch.mm(a, a)
        t0 = time.perf_counter()
        torch.mm(a, a)
        if time.perf_counter() - t0 >= SLOW_MATMUL_SECONDS:
            break
        size *= 2
    return size


def measure_matmul_peak(dtype: torch.dtype, size: int | None = None, min_trials: int = MIN_TRIALS,
                        min_seconds: float = MIN_TRIAL_SECONDS, largest: int = MATMUL_SIZE) -> float:
    """FLOP/s of a size x size matmul with the current thread count: the fastest trial after a warm-up, of at
    least `min_trials` trials over at least `min_seconds`. size None: pick_matmul_size(dtype, largest)."""
    size = size or pick_matmul_size(dtype, largest)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(2):  # warm-up: kernel selection, page faults of the output, CPU frequency ramp
        torch.mm(a, b)
    best, trials, start = float("inf"), 0, time.perf_counter()
    while trials < MAX_TRIALS and (trials < min_trials or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        trials += 1
    return 2 * size**3 / best


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq, steal) since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True)
class Measurement:
    flops: float
    busy_elsewhere: float | None  # share of all cores' time others took during the trials; None: unknown

    @property
    def clean(self) -> bool:
        return self.busy_elsewhere is None or self.busy_elsewhere <= BUSY_ELSEWHERE_LIMIT


def measure_peak_and_load(dtype: torch.dtype) -> Measurement:
    """The peak, and how much of the machine other processes took while it was measured."""
    busy0, own0, wall0 = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    flops = measure_matmul_peak(dtype)
    busy1, own1, wall = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter() - wall0
    if busy0 is None or busy1 is None or wall < MIN_LOAD_WINDOW_SECONDS:
        return Measurement(flops, None)
    elsewhere = (busy1 - busy0) - (own1 - own0)
    return Measurement(flops, max(0.0, elsewhere) / (wall * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class CpuPeak:
    flops: float
    source: str  # where the number came from, for the device line


def cache_key(dtype: torch.dtype, threads: int) -> str:
    return f"{cpu_name()} [{cpu_isa()}] | {str(dtype).removeprefix('torch.')} | {threads} threads"


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
    key = cache_key(dtype, torch.get_num_threads())
    entries = _read_cache(path)
    cached = entries.get(key)
    if not remeasure and isinstance(cached, (int, float)) and cached > 0:
        return CpuPeak(float(cached), f"cached in {path}; --metrics.remeasure_peak=true to measure again")
    m = measure_peak_and_load(dtype)
    how = f"measured now, fastest of {MIN_TRIALS}+ square matmuls over {MIN_TRIAL_SECONDS:g}s"
    if not m.clean:
        return CpuPeak(m.flops, f"{how}, while other processes took {m.busy_elsewhere:.0%} of the cores: "
                                f"likely low (MFU reads high), not cached; measured again next start")
    entries[key] = m.flops
    where = f"saved to {path}" if _write_cache(path, entries) else "not cached: the cache folder is not writable"
    return CpuPeak(m.flops, f"{how}; {where}")
