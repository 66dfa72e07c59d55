"""What the user sees: device line, peak FLOPs, MFU, the step line, TensorBoard, optional W&B, memory.

Rank 0 writes; every other rank gets a MetricsLogger that does nothing.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from titanlite.errors import UserError
from titanlite.logging_utils import logger

# Dense BF16 tensor-core peak per device, matched on the lower-cased device name: the first row whose
# substrings all occur wins, so the specific variants (NVL, PCIe) come before the plain name.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("gb200",), 2.5e15), (("grace blackwell",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
    (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800", "nvl"), 989e12), (("h800",), 756e12),
    (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12), (("a30",), 165e12),
    (("l40s",), 362e12), (("l40-s",), 362e12), (("l40 s",), 362e12), (("l4",), 121e12),
    (("mi355",), 2.5e15), (("mi325",), 1.3074e15), (("mi300x",), 1.3074e15), (("mi300a",), 980.6e12),
    (("mi250x",), 383e12), (("mi250",), 362.1e12),
    (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
]


def peak_flops_for_gpu(name: str) -> float:
    """BF16 peak for a GPU name; inf (so MFU reads 0) when the device is unknown rather than a guess."""
    lowered = name.lower()
    for needles, flops in PEAK_BF16_FLOPS:
        if all(n in lowered for n in needles):
            return flops
    return float("inf")


def measure_matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a size x size matmul on this CPU with the current thread count (best of `repeats`)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: first call pays for kernel selection
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


@dataclass
class DeviceInfo:
    line: str          # the device line printed at start
    peak_flops: float  # per device, in the compute dtype (BF16 on GPUs)


def describe_device(device: torch.device, compute_dtype: torch.dtype) -> DeviceInfo:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_flops_for_gpu(name)
        return DeviceInfo(f"GPU: {name} | Peak FLOPS (BF16): {peak:.2e}", peak)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        peak = measure_matmul_peak(compute_dtype)
        label = "BF16" if compute_dtype == torch.bfloat16 else "FP32"
        return DeviceInfo(f"CPU: {cpu_name()} | {os.cpu_count()} cores, {threads} threads | "
                          f"Peak FLOPS ({label}, measured 2048x2048 matmul): {peak:.2e}", peak)
    return DeviceInfo(f"{device.type.upper()} device | Peak FLOPS: unknown (MFU not reported)", float("inf"))


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # CPU: the process's peak resident set (Linux reports KiB)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover - non-Unix
        return float("nan")


def format_step_line(step: int, num_iterations: int, loss: float, lrm: float, dt: float, tok_per_sec: float,
                     mfu: float, position: str, total_time_s: float, eta_s: float | None) -> str:
    pct = 100.0 * step / max(num_iterations, 1)
    eta = f"{eta_s / 60:.1f}m" if eta_s is not None else "n/a"
    return (f"step {step:05d}/{num_iterations:05d} ({pct:.2f}%) | loss: {loss:.6f} | lrm: {lrm:.2f} | "
            f"dt: {dt * 1000:.2f}ms | tok/sec: {int(tok_per_sec):,} | mfu: {mfu:.2f} | {position} | "
            f"total time: {total_time_s / 60:.2f}m | eta: {eta}")


class MetricsLogger:
    """Fans scalars and text out to TensorBoard and (when `run` is not 'dummy') Weights & Biases."""

    def __init__(self, metrics_cfg, run_dir: Path, config_dict: dict, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if metrics_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        if metrics_cfg.run != "dummy":
            try:
                import wandb
            except ImportError:
                raise UserError(f"metrics.run is {metrics_cfg.run!r} but wandb is not installed: "
                                f"pip install 'titanlite[wandb]', or use --metrics.run=dummy") from None
            self.wandb = wandb.init(project=metrics_cfg.wandb_project, name=metrics_cfg.run, config=config_dict)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({"step": step, **values}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
