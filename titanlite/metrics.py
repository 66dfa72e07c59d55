"""What the user sees: device line, peak FLOPs, MFU, the step line, TensorBoard, optional W&B, memory.

Rank 0 writes; every other rank gets a MetricsLogger that does nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from titanlite.cpu_peak import cpu_name, cpu_peak_flops
from titanlite.errors import UserError
from titanlite.fs_errors import fs_error_line

# Dense BF16 tensor-core peak per device, matched on the lower-cased device name: the first row whose
# substrings all occur wins, so the specific variants (NVL, PCIe) come before the plain name.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("gb200",), 2.5e15), (("grace blackwell",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12), (("h200", "pcie"), 836e12), (("h200",), 989e12),
    (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800", "nvl"), 989e12), (("h800",), 756e12),
    (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12), (("a30",), 165e12),
    (("l40s",), 362e12), (("l40-s",), 362e12), (("l40 s",), 362e12),
    (("l40",), 181.05e12), (("l4",), 121e12),
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


@dataclass
class DeviceInfo:
    line: str          # the device line printed at start
    peak_flops: float  # per device, in the compute dtype (BF16 on GPUs)


def describe_device(device: torch.device, compute_dtype: torch.dtype, peak_override: float = 0.0,
                    remeasure_peak: bool = False) -> DeviceInfo:
    """The device line and the peak MFU divides by; `peak_override` > 0 replaces the table or measurement."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, source = ((peak_override, "set by metrics.peak_flops") if peak_override > 0
                        else (peak_flops_for_gpu(name), "datasheet, dense"))
        return DeviceInfo(f"GPU: {name} | Peak FLOPS (BF16): {peak:.2e} ({source})", peak)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        peak = cpu_peak_flops(compute_dtype, peak_override, remeasure_peak)
        label = "BF16" if compute_dtype == torch.bfloat16 else "FP32"
        return DeviceInfo(f"CPU: {cpu_name()} | {os.cpu_count()} cores, {threads} threads | "
                          f"Peak FLOPS ({label} matmul): {peak.flops:.2e} ({peak.source})", peak.flops)
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


def _quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes events from a thread that keeps a failure for the writer's next call, where
    MetricsLogger turns it into one line, but also lets Python print the thread's traceback: skip that
    traceback for filesystem errors (every other thread and error still reaches the previous hook)."""
    previous = threading.excepthook
    if getattr(previous, "_titanlite_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook._titanlite_tensorboard = True
    threading.excepthook = hook


class MetricsLogger:
    """Fans scalars and text out to TensorBoard and (when `run` is not 'dummy') Weights & Biases."""

    def __init__(self, metrics_cfg, run_dir: Path, config_dict: dict, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.tb_dir = Path(run_dir) / "tb"
        if not enabled:
            return
        if metrics_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread_errors()
            with self._tb_errors():
                self.tb = SummaryWriter(log_dir=str(self.tb_dir))
        if metrics_cfg.run != "dummy":
            try:
                import wandb
            except ImportError:
                raise UserError(f"metrics.run is {metrics_cfg.run!r} but wandb is not installed: "
                                f"pip install 'titanlite[wandb]', or use --metrics.run=dummy") from None
            self.wandb = wandb.init(project=metrics_cfg.wandb_project, name=metrics_cfg.run, config=config_dict)

    @contextlib.contextmanager
    def _tb_errors(self):
        """A failed TensorBoard write (disk full, folder turned read-only) is one line naming the folder. The
        writer is dropped unclosed: closing flushes into the same failure, and its thread may be gone."""
        try:
            yield
        except OSError as exc:
            self.tb = None
            advice = "free space or make the folder writable, or run with --metrics.tensorboard=false"
            line = fs_error_line("write TensorBoard events to", self.tb_dir, exc, advice)
            raise UserError(line or f"cannot write TensorBoard events to {self.tb_dir}: {exc}") from None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            with self._tb_errors():
                for tag, value in values.items():
                    self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({"step": step, **values}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            with self._tb_errors():
                self.tb.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def flush(self) -> None:
        if self.tb is not None:
            with self._tb_errors():
                self.tb.flush()

    def close(self) -> None:
        try:
            if self.tb is not None:
                with self._tb_errors():
                    self.tb.close()
                self.tb = None
        finally:
            if self.wandb is not None:
                self.wandb.finish()
                self.wandb = None
