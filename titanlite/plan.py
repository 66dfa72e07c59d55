"""`python -m titanlite.plan --job.config_file FILE [--world-size N] [--mfu 0.4] [--gpu h100] [--simulate [--ladder]]
[--section.key=v]`

Before renting GPUs: the derived plan (the same block the trainer prints), the estimated memory per GPU and a
wall-clock estimate, without building a model. Every `--section.key=value` of the trainer works here too.

--simulate runs one real training step on a fake process group of N ranks (titanlite.simulate) and prints the
measured per-rank peak next to the estimate, whether it fits --gpu and the largest device batch that does, with and
without activation checkpointing; --ladder adds the deepest model whose compute-optimal run fits.

Memory is the model family's own estimate (TrainSpec.estimate_memory: the GPT's is in models/gpt/memory.py,
counted tensor by tensor); a family without one gets the plan and the wall clock only."""

from __future__ import annotations

import argparse
import sys

from titanlite.cli import run_cli
from titanlite.config import load_config
from titanlite.distributed import resolve_degrees
from titanlite.elastic import format_fault_costs
from titanlite.errors import UserError
from titanlite.logging_utils import init_logger, logger
from titanlite.metrics import peak_flops_for_gpu
from titanlite.models import get_train_spec
from titanlite.parallelize import compile_enabled
from titanlite.scaling import derive_plan, format_plan
from titanlite.spec import MemoryEstimate

GIB = 2 ** 30
FP32 = 4


def wall_clock_seconds(plan, mfu: float, peak_flops_per_gpu: float, num_gpus: int) -> float:
    return plan.total_flops / (mfu * peak_flops_per_gpu * num_gpus)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_memory(est: MemoryEstimate, plan, gpu_memory_gib: float | None) -> str:
    dtype = "bf16" if est.compute_bytes == 2 else "fp32"
    fsdp = f"FSDP over {est.shard_degree} ranks" if est.shard_degree > 1 else "one device, no FSDP"
    lines = [
        f"Memory per GPU (estimate; {fsdp}, {dtype} compute, {'compiled' if est.compiled else 'eager'}, "
        f"device batch {plan.device_batch_size} x "
        f"{plan.seq_len:,} tokens):",
        f"  parameters (fp32 master) : {_gib(est.parameters)}",
        f"  gradients (fp32)         : {_gib(est.gradients)}",
        f"  optimizer states         : {_gib(est.optimizer_states)}  (AdamW 2 moments; Muon momentum + NorMuon)",
        f"  {dtype} weight copies       : {_gib(est.weight_copies)}",
        f"  activations, no AC       : {_gib(est.activations)}",
        f"  {'activations, ' + est.ac_mode + ' AC':<24} : {_gib(est.activations_ac)}",
    ]
    for label, value in (("total, no AC", est.total), (f"total, {est.ac_mode} AC", est.total_ac)):
        verdict = ""
        if gpu_memory_gib:
            verdict = "  fits" if value / GIB <= 0.92 * gpu_memory_gib else "  DOES NOT FIT"
            verdict += f" in {gpu_memory_gib:.0f} GiB"
        lines.append(f"  {label:<24} : {_gib(value)}{verdict}")
    lines.append("  (not counted: CUDA context and allocator fragmentation, budget ~2-4 GiB)")
    return "\n".join(lines)


# GPU memory in GiB, matched like the peak-FLOPs table (first row whose substrings all occur wins)
GPU_MEMORY_GIB = [(("h200",), 141), (("h100", "nvl"), 94), (("h100",), 80), (("h800",), 80), (("a100", "40"), 40),
                  (("a100",), 80), (("b200",), 180), (("gb200",), 186), (("l40",), 48), (("l4",), 24),
                  (("4090",), 24), (("5090",), 32), (("3090",), 24), (("mi300x",), 192)]


def gpu_memory_gib(name: str) -> float | None:
    lowered = name.lower()
    for needles, gib in GPU_MEMORY_GIB:
        if all(n in lowered for n in needles):
            return gib
    return None


def build_report(config, world_size: int, mfu: float, gpu: str) -> dict:
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} must be in (0, 1], e.g. 0.4 for 40%")
    spec = get_train_spec(config.model.name)
    plan = derive_plan(config.model, config.training, config.optimizer, config.data.vocab_size, world_size, spec)
    _, shard = resolve_degrees(world_size, config.parallelism.dp_shard, config.parallelism.dp_replicate)
    compute_bytes = FP32 if config.training.dtype == "float32" else 2  # auto plans for a bf16 GPU
    compiled = compile_enabled(config.compile, "cuda")  # the plan is for GPUs: compile "auto" means on
    est = None
    if spec.estimate_memory is not None:
        est = spec.estimate_memory(plan, compute_bytes, shard, config.activation_checkpoint.mode,
                                   config.activation_checkpoint.selective_every, compiled=compiled)
    peak = peak_flops_for_gpu(gpu)
    if peak == float("inf"):
        raise UserError(f"--gpu {gpu!r} is not in the peak-FLOPs table (titanlite.metrics.PEAK_BF16_FLOPS); "
                        "use a name such as h100, h200, a100, b200")
    return {"plan": plan, "memory": est, "fault_costs": format_fault_costs(plan, spec, config.checkpoint),
            "wall_clock_s": wall_clock_seconds(plan, mfu, peak, world_size),
            "peak_flops": peak, "mfu": mfu, "gpu": gpu, "world_size": world_size,
            "gpu_memory_gib": gpu_memory_gib(gpu)}


def format_report(report: dict) -> str:
    plan, secs = report["plan"], report["wall_clock_s"]
    memory = (format_memory(report["memory"], plan, report["gpu_memory_gib"]) if report["memory"] is not None
              else f"Memory per GPU: no estimate for model.name = {plan.model_name!r} (its TrainSpec has none; "
                 "--simulate measures it)")
    return "\n".join([
        format_plan(plan),
        report["fault_costs"],
        memory,
        f"Wall clock at MFU {100 * report['mfu']:.0f}% on {report['world_size']} x {report['gpu']} "
        f"({report['peak_flops'] / 1e12:,.0f} TFLOP/s bf16 peak each): {secs / 3600:.2f} h ({secs:,.0f} s) for "
        f"{plan.total_flops:.4e} FLOPs",
    ])


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m titanlite.plan", description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=0,
                   help="GPUs (default: parallelism.world_size, or 1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the wall-clock estimate")
    p.add_argument("--gpu", default="h100", help="GPU name for the peak-FLOPs table and memory size")
    p.add_argument("--simulate", action="store_true",
                   help="also run one real training step on a fake process group of --world-size ranks and "
                        "report the measured per-rank peak and the largest device batch that fits --gpu")
    p.add_argument("--ladder", action="store_true",
                   help="with --simulate: the deepest model (d12..d48) whose compute-optimal run fits --gpu")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        parse_args(["--help"])  # prints the planner's flags and exits; config keys: python -m titanlite.train -h
    args, rest = parse_args(argv)
    config = load_config(rest)
    world = args.world_size or (config.parallelism.world_size if config.parallelism.world_size > 0 else 1)
    init_logger()
    report = build_report(config, world, args.mfu, args.gpu)
    if args.ladder:
        if not args.simulate or not report["gpu_memory_gib"]:
            raise UserError("--ladder needs --simulate and a --gpu whose memory is known (e.g. h100, h200, a100)")
        from titanlite.plan_simulate import ladder_report
        logger.info(ladder_report(config, world, args.gpu, report["gpu_memory_gib"], args.mfu, report["peak_flops"]))
        return 0
    logger.info(format_report(report))
    if args.simulate:
        from titanlite.plan_simulate import simulate_report  # fake process groups: only when asked for
        logger.info(simulate_report(config, world, args.gpu, report["gpu_memory_gib"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
