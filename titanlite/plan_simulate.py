"""`python -m titanlite.plan --simulate [--ladder]`: the simulated step next to the planner's estimate, the largest
device batch that fits a GPU with and without activation checkpointing, and the depth ladder.

The memory figures come from titanlite.simulate (one real training step on a fake process group of N ranks);
the fit verdict adds `gpu_allowance` for what is not a tensor. Each result is also kept in the cache folder
(`simulated_fits.json`) so that an out-of-memory stop can name the batch the simulation found.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from titanlite.errors import UserError
from titanlite.models import get_train_spec
from titanlite.paths import cache_dir
from titanlite.scaling import derive_plan
from titanlite.simulate import (GIB, SIMULATION_NOTES, CUDA_CONTEXT_BYTES, FRAGMENTATION_SHARE, NCCL_BUFFER_BYTES,
                                SimResult, gpu_allowance, simulate_step)

AGREEMENT = 0.10  # the estimate and the simulated peak agree within this share, or the output says they do not
SEARCH_MICRO_STEPS = 2  # the batch search runs two micro-steps: from the second on, each repeats the last one
LADDER_DEPTHS = (12, 16, 20, 24, 26, 28, 32, 36, 40, 44, 48)
FITS_FILE = "simulated_fits.json"
MAX_DEVICE_BATCH = 1024


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f} GiB"


def fits(result: SimResult, gpu_bytes: int) -> bool:
    return result.peak_bytes + gpu_allowance(result.peak_bytes) <= gpu_bytes


def with_training(config, **changes):
    return dataclasses.replace(config, training=dataclasses.replace(config.training, **changes))


def with_ac(config, mode: str):
    return dataclasses.replace(config, activation_checkpoint=dataclasses.replace(config.activation_checkpoint,
                                                                                 mode=mode))


def batch_candidates(config, world_size: int) -> list[int]:
    """Powers of two (and the configured batch) whose micro-steps tile the run's total batch, ascending."""
    spec = get_train_spec(config.model.name)
    out = set()
    for b in sorted({*(2 ** i for i in range(11)), config.training.device_batch_size}):
        if b > MAX_DEVICE_BATCH:
            continue
        try:
            plan = derive_plan(config.model, with_training(config, device_batch_size=b).training, config.optimizer,
                               config.data.vocab_size, world_size, spec)
        except UserError:
            continue
        if plan.device_batch_size == b:
            out.add(b)
    return sorted(out)


def _linear_peak(result: SimResult, batch: int) -> float:
    """The peak at another device batch, from one simulated point: the parameters, gradients and optimizer
    states stay, the rest scales with the tokens of a micro-step."""
    static = sum(result.static_bytes.values())
    return static + (result.peak_bytes - static) * batch / result.device_batch_size


def largest_fitting_batch(config, world_size: int, gpu_bytes: int, ac_mode: str, first_guess: int,
                          known: dict[int, SimResult] | None = None) -> tuple[int | None, dict[int, SimResult]]:
    """(largest device batch whose simulated step fits, every simulation run): starts at `first_guess`, steps
    down while it does not fit, and up while the next batch is predicted to fit and then simulates so."""
    config = with_ac(config, ac_mode)
    results = dict(known or {})
    candidates = batch_candidates(config, world_size)
    if not candidates:
        return None, results

    def simulated(b: int) -> SimResult:
        if b not in results:
            results[b] = simulate_step(with_training(config, device_batch_size=b), world_size,
                                       micro_steps=SEARCH_MICRO_STEPS)
        return results[b]

    i = max([k for k, b in enumerate(candidates) if b <= first_guess] or [0])
    while not fits(simulated(candidates[i]), gpu_bytes):
        if i == 0:
            return None, results
        i -= 1
    while i + 1 < len(candidates):
        bigger = candidates[i + 1]
        predicted = _linear_peak(results[candidates[i]], bigger)
        if predicted + gpu_allowance(int(predicted)) > gpu_bytes or not fits(simulated(bigger), gpu_bytes):
            break
        i += 1
    return candidates[i], results


# ----- the report --------------------------------------------------------------------------------------------

def _estimate(config, world_size: int, plan, compiled: bool):
    spec = get_train_spec(config.model.name)
    if spec.estimate_memory is None:
        return None
    from titanlite.distributed import resolve_degrees

    _, shard = resolve_degrees(world_size, config.parallelism.dp_shard, config.parallelism.dp_replicate)
    compute_bytes = 4 if config.training.dtype == "float32" else 2
    return spec.estimate_memory(plan, compute_bytes, shard, config.activation_checkpoint.mode,
                                config.activation_checkpoint.selective_every, compiled=compiled)


def _mesh_text(result: SimResult) -> str:
    if result.dp_replicate > 1:
        return f"HSDP {result.dp_replicate} x {result.dp_shard}"
    return f"FSDP over {result.dp_shard}"


def format_simulation(config, result: SimResult, gpu: str, gpu_gib: float | None,
                      best: dict[str, int | None] | None, best_peaks: dict[str, int]) -> str:
    spec = get_train_spec(config.model.name)
    plan = derive_plan(config.model, config.training, config.optimizer, config.data.vocab_size,
                       result.world_size, spec)
    est = _estimate(config, result.world_size, plan, compiled=False)
    b = result.breakdown
    lines = [f"Simulated training step (rank {result.rank} of {result.world_size:,}, {_mesh_text(result)}; device batch "
             f"{result.device_batch_size}, AC {result.ac_mode}, {result.micro_steps} of {result.plan_micro_steps} "
             f"micro-steps; {result.seconds:.0f} s on this CPU):",
             f"  {'':26}{'estimate':>12}{'simulated':>12}   (simulated: at the peak)"]
    if est is not None:
        act = est.activations_ac if result.ac_mode != "none" else est.activations
        rows = [("parameters + bf16 copies", est.parameters + est.weight_copies, b["parameters"]),
                ("gradients", est.gradients, b["gradients"]),
                ("optimizer states", est.optimizer_states, b["optimizer states"]),
                ("activations + temporaries", act, b["activations"] + b["temporaries"] + b["other"])]
        estimate_total = est.total_ac if result.ac_mode != "none" else est.total
    else:
        rows = [("parameters + bf16 copies", None, b["parameters"]), ("gradients", None, b["gradients"]),
                ("optimizer states", None, b["optimizer states"]),
                ("activations + temporaries", None, b["activations"] + b["temporaries"] + b["other"])]
        estimate_total = None
    for label, e, s in rows:
        lines.append(f"  {label:<26}{_gib(e) if e is not None else '          -':>12}{_gib(s):>12}")
    peak = result.peak_bytes
    if estimate_total is not None:
        gap = (estimate_total - peak) / peak
        verdict = "agree" if abs(gap) <= AGREEMENT else "DISAGREE"
        lines.append(f"  {'peak per GPU':<26}{_gib(estimate_total):>12}{_gib(peak):>12}   "
                     f"estimate {gap:+.1%} ({verdict} within {AGREEMENT:.0%}; the estimate is eager, as simulated)")
        compiled = _estimate(config, result.world_size, plan, compiled=True)
        if compiled is not None:
            total_c = compiled.total_ac if result.ac_mode != "none" else compiled.total
            lines.append(f"  {'estimate with compile':<26}{_gib(total_c):>12}"
                         f"{'':12}   (torch.compile is not simulated)")
    else:
        lines.append(f"  {'peak per GPU':<26}{'-':>12}{_gib(peak):>12}   (this family has no estimate)")
    allowance = gpu_allowance(peak)
    lines.append(f"  GPU allowance (not tensors, not simulated): CUDA context + cuBLAS workspaces "
                 f"{CUDA_CONTEXT_BYTES / GIB:.1f} GiB, NCCL buffers {NCCL_BUFFER_BYTES / GIB:.1f} GiB, allocator "
                 f"fragmentation {FRAGMENTATION_SHARE:.0%} of the peak = {allowance / GIB:.2f} GiB")
    if gpu_gib:
        need = peak + allowance
        verdict = "fits" if need <= gpu_gib * GIB else "DOES NOT FIT"
        lines.append(f"  {gpu}: {verdict} ({need / GIB:.2f} of {gpu_gib:.0f} GiB)")
    if best is not None and gpu_gib:
        parts = []
        largest = max(batch_candidates(config, result.world_size), default=None)
        for mode, batch in best.items():
            if batch is None:
                parts.append(f"AC {mode}: none (not even device batch 1)")
            else:
                limit = ", the most the total batch allows" if batch == largest else ""
                parts.append(f"AC {mode}: {batch} (simulated {best_peaks[mode] / GIB:.2f} GiB{limit})")
        lines.append(f"  largest device batch that fits {gpu_gib:.0f} GiB: " + "; ".join(parts))
    if result.fsdp_units:
        lines.append(f"  FSDP units: {len(result.fsdp_units)} ({', '.join(result.fsdp_units[:4])}, ...)")
    if result.muon_owned:
        owned = sum(result.muon_owned.values())
        lines.append(f"  distributed Muon: rank 0 orthogonalises {owned} matrices "
                     f"({', '.join(f'{k} {v}' for k, v in result.muon_owned.items())})")
    lines.append("  not simulated: " + "; ".join(SIMULATION_NOTES))
    return "\n".join(lines)


def simulate_report(config, world_size: int, gpu: str, gpu_gib: float | None, search: bool = True) -> str:
    result = simulate_step(config, world_size)
    best, best_peaks = None, {}
    if search and gpu_gib:
        best = {}
        gpu_bytes = int(gpu_gib * GIB)
        known = {result.device_batch_size: result} if result.ac_mode == "none" else {}
        for mode in ("none", "full"):
            guess = result.device_batch_size
            batch, runs = largest_fitting_batch(config, world_size, gpu_bytes, mode, guess,
                                                known if mode == "none" else
                                                ({result.device_batch_size: result} if result.ac_mode == "full"
                                                 else {}))
            best[mode] = batch
            if batch is not None:
                best_peaks[mode] = runs[batch].peak_bytes
        remember_fit(config, world_size, gpu_gib, best)
    return format_simulation(config, result, gpu, gpu_gib, best, best_peaks)


# ----- the ladder --------------------------------------------------------------------------------------------

def ladder_report(config, world_size: int, gpu: str, gpu_gib: float, mfu: float, peak_flops: float) -> str:
    """For each depth: the compute-optimal run (the config's horizon, auto total batch), the largest device batch
    that fits without AC, else with full AC, and the wall clock; the answer is the deepest that fits."""
    gpu_bytes = int(gpu_gib * GIB)
    spec = get_train_spec(config.model.name)
    lines = [f"Depth ladder on {world_size:,} x {gpu} ({gpu_gib:.0f} GiB), compute-optimal runs (auto total batch, "
             f"training horizon as configured), wall clock at MFU {mfu:.0%}:",
             f"  {'depth':>5} {'params':>8} {'tokens':>9} {'device batch':>12} {'AC':>5} {'simulated':>10} "
             f"{'wall clock':>11}"]
    deepest = None
    for depth in LADDER_DEPTHS:
        cfg = dataclasses.replace(config, model=dataclasses.replace(config.model, depth=depth),
                                  training=dataclasses.replace(config.training, total_batch_size=-1))
        plan = derive_plan(cfg.model, cfg.training, cfg.optimizer, cfg.data.vocab_size, world_size, spec)
        chosen = None
        for mode in ("none", "full"):
            guess = _estimated_batch(cfg, world_size, gpu_bytes, mode)
            if guess is None:  # no estimate: from the config's batch; nothing fits the estimate: from the smallest
                guess = plan.device_batch_size if spec.estimate_memory is None else 1
            batch, runs = largest_fitting_batch(cfg, world_size, gpu_bytes, mode, guess)
            if batch is not None:
                chosen = (batch, mode, runs[batch].peak_bytes)
                break
        hours = plan.total_flops / (mfu * peak_flops * world_size) / 3600
        if chosen is None:
            lines.append(f"  {depth:>5} {plan.params['total'] / 1e9:7.2f}B {plan.total_tokens / 1e9:8.1f}B "
                         f"{'none fits':>12} {'':>5} {'':>10} {hours:10.1f}h")
            break
        deepest = (depth, *chosen, hours)
        lines.append(f"  {depth:>5} {plan.params['total'] / 1e9:7.2f}B {plan.total_tokens / 1e9:8.1f}B "
                     f"{chosen[0]:>12} {chosen[1]:>5} {chosen[2] / GIB:8.2f} G {hours:10.1f}h")
    if deepest is None:
        lines.append("  no depth fits")
    else:
        d, batch, mode, _, hours = deepest
        lines.append(f"  deepest that fits: d{d} at --training.device_batch_size={batch} "
                     f"--activation_checkpoint.mode={mode}, about {hours:.1f} h")
    lines.append("  not simulated: " + "; ".join(SIMULATION_NOTES))
    return "\n".join(lines)


def _estimated_batch(config, world_size: int, gpu_bytes: int, mode: str) -> int | None:
    """The largest candidate batch the analytic (eager) estimate says fits: where the search starts."""
    spec = get_train_spec(config.model.name)
    if spec.estimate_memory is None:
        return None
    best = None
    for b in batch_candidates(config, world_size):
        cfg = with_ac(with_training(config, device_batch_size=b), mode)
        plan = derive_plan(cfg.model, cfg.training, cfg.optimizer, cfg.data.vocab_size, world_size, spec)
        est = _estimate(cfg, world_size, plan, compiled=False)
        total = est.total_ac if mode != "none" else est.total
        if total + gpu_allowance(total) <= gpu_bytes:
            best = b
    return best


# ----- remembered for the out-of-memory advice ---------------------------------------------------------------

def fit_key(config, world_size: int) -> str:
    m, p = config.model, config.parallelism
    return (f"{m.name} d{m.depth} T{m.max_seq_len} ar{m.aspect_ratio} hd{m.head_dim} float8={config.float8.enabled} "
            f"world {world_size} replicate {p.dp_replicate}")


def _fits_path() -> Path:
    return cache_dir() / FITS_FILE


def remember_fit(config, world_size: int, gpu_gib: float, best: dict[str, int | None]) -> None:
    path = _fits_path()
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        entries.setdefault(fit_key(config, world_size), {})[f"{gpu_gib:g}"] = best
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except (OSError, ValueError, AttributeError):
        pass  # only a cache: the advice then names the command instead


# a GPU reports a little less than its marketed size (an "80 GB" H100: 79.1 GiB): match within this share
GPU_SIZE_MATCH = 0.08


def remembered_fit(config, world_size: int, gpu_gib: float) -> dict | None:
    """The fits remembered for this model and world on a GPU of about `gpu_gib` (the closest size within 8%)."""
    try:
        by_size = json.loads(_fits_path().read_text()).get(fit_key(config, world_size)) or {}
        sizes = [float(k) for k in by_size if abs(float(k) - gpu_gib) <= GPU_SIZE_MATCH * float(k)]
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return by_size[f"{min(sizes, key=lambda k: abs(k - gpu_gib)):g}"] if sizes else None


def oom_simulation_hint(config, world) -> tuple[dict | None, str]:
    """(the fits `plan --simulate` remembered for this model, world and GPU, or None; the command that finds
    them) for the out-of-memory line. CUDA only: the simulation budgets a GPU's memory."""
    if world.device.type != "cuda":
        return None, ""
    import torch

    gpu_gib = torch.cuda.get_device_properties(world.device).total_memory / GIB
    name = torch.cuda.get_device_name(world.device).split()[-1].lower()
    command = (f"python -m titanlite.plan --simulate --job.config_file {config.job.config_file or 'FILE'} "
               f"--world-size {world.world_size} --gpu {name}")
    return remembered_fit(config, world.world_size, gpu_gib), command
