"""One-command acceptance check of a GPU machine: prints one table and writes JSON.

    python -m scripts.gpu_check                    # a GPU machine after the README's GPU set-up, <= ~8 minutes
    python -m scripts.gpu_check --smoke            # any machine: the same code path on a tiny model (CI)

What it checks: device, torch / CUDA / driver versions; every attention backend's availability (and why not)
and its forward + backward agreement with SDPA for a short (S) and a full (L) window; the training step of a d12
model for eager, compile, compile + float8 tensorwise and compile + float8 rowwise (tok/s, MFU, peak memory);
that compile and eager give the same losses to bf16 tolerance; and one FSDP step on 2 GPUs when 2 are visible.
Training runs use the embedded corpus (no download). A check that cannot run here is listed with the reason;
the exit code is 1 when a check that ran failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

FULL = {"depth": 12, "seq_len": 2048, "device_batch_size": 16, "steps": 20, "vocab_size": 8192,
        "attn_shape": (2, 2048, 6, 128)}
SMOKE = {"depth": 2, "seq_len": 128, "device_batch_size": 2, "steps": 3, "vocab_size": 512,
         "attn_shape": (1, 256, 2, 32)}
# max |x - sdpa| / max |sdpa|: bf16 rounding of outputs and of gradients summed over the keys
TOLERANCE = {"bfloat16": (2e-2, 5e-2), "float16": (5e-3, 2e-2), "float32": (1e-4, 1e-3)}
LOSS_RTOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}  # compile vs eager, every step
MODES = (("eager", False, None), ("compile", True, None), ("compile + float8 tensorwise", True, "tensorwise"),
         ("compile + float8 rowwise", True, "rowwise"))


def environment(device) -> dict:
    import torch

    env = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["cuda"] = torch.version.cuda
        env["gpus_visible"] = torch.cuda.device_count()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else "n/a"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            env["driver"] = "n/a (nvidia-smi not found)"
    else:
        from titanlite.cpu_peak import cpu_name

        env["cpu"] = cpu_name()
    return env


# ---------------------------------------------------------------------------------------------------------------

def _relative_error(got, want) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def attention_checks(device, dtype, shape) -> list[dict]:
    """Each backend against SDPA, forward and backward, for a quarter-context (S) and a full (L) window."""
    import torch

    from titanlite.attention import BACKENDS, attention, backend_available, reset_kernels
    from titanlite.models.gpt.model import window_sizes

    reset_kernels()
    B, T, H, D = shape
    short = window_sizes(2, T, "S")[0]
    dtype_name = str(dtype).replace("torch.", "")
    fwd_tol, grad_tol = TOLERANCE[dtype_name]
    rows = []
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(B, T, H, D, generator=g).to(device, dtype) for _ in range(3)]
    grad_out = torch.randn(B, T, H, D, generator=g).to(device, dtype)
    for window_name, window in (("S", short), ("L", T)):
        ref_in = [x.clone().requires_grad_(True) for x in base]
        ref = attention(*ref_in, window, backend="sdpa")
        ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
        for name in BACKENDS:
            row = {"backend": name, "window": f"{window_name} ({window})"}
            ok, why = backend_available(name, device.type, dtype)
            if not ok:
                rows.append({**row, "status": "skipped", "reason": why})
                continue
            try:
                inputs = [x.clone().requires_grad_(True) for x in base]
                out = attention(*inputs, window, backend=name)
                grads = torch.autograd.grad(out, inputs, grad_out)
                fwd = _relative_error(out, ref)
                grad = max(_relative_error(a, b) for a, b in zip(grads, ref_grads))
                passed = fwd <= fwd_tol and grad <= grad_tol
                rows.append({**row, "status": "ok" if passed else "FAILED", "forward_error": fwd,
                             "grad_error": grad, "tolerance": [fwd_tol, grad_tol]})
            except Exception as error:  # noqa: BLE001 - a kernel that crashes is a failed check, not a crash
                rows.append({**row, "status": "FAILED", "reason": f"{type(error).__name__}: {error}"[:300]})
    return rows


# ---------------------------------------------------------------------------------------------------------------

def _train_overrides(sizes: dict, device_type: str, dtype_name: str, tmp: str) -> list[str]:
    tokens = sizes["device_batch_size"] * sizes["seq_len"]
    return [f"--model.depth={sizes['depth']}", f"--model.max_seq_len={sizes['seq_len']}",
            f"--training.device_type={device_type}", f"--training.dtype={dtype_name}",
            f"--training.device_batch_size={sizes['device_batch_size']}", f"--training.total_batch_size={tokens}",
            "--data.dataset=embedded", f"--data.vocab_size={sizes['vocab_size']}", "--eval.eval_every=-1",
            "--eval.sample_every=-1", "--eval.core_metric_every=-1", "--checkpoint.enabled=false",
            f"--job.dump_folder={tmp}", "--lr_scheduler.warmup_steps=0"]


def train_mode(name: str, overrides: list[str], steps: int) -> dict:
    """`steps` training steps of the Trainer in this process: tok/s (after the first step), MFU, peak memory."""
    import gc

    import torch

    from titanlite.config import load_config
    from titanlite.metrics import peak_memory_mib
    from titanlite.train import Trainer

    trainer = Trainer(load_config(overrides))
    device = trainer.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    try:
        for step in range(steps):
            sync()
            start = time.perf_counter()
            loss = trainer.train_step(step)
            sync()
            times.append(time.perf_counter() - start)
            losses.append(float(trainer.world.all_reduce_sum(loss.detach().clone()).item()))
            if step == 0:
                gc.collect()
        timed = times[1:] or times  # the first step compiles
        tokens = trainer.plan.total_batch_size
        tok_per_s = tokens * len(timed) / sum(timed)
        mfu = trainer.plan.flops_per_token * tok_per_s / (trainer.device_info.peak_flops * trainer.world.world_size)
        return {"mode": name, "status": "ok", "attention_backend": getattr(trainer.model, "attention_backend", ""),
                "tokens_per_step": tokens, "first_step_s": times[0], "tok_per_s": tok_per_s, "mfu": mfu,
                "peak_memory_mib": peak_memory_mib(device), "losses": losses}
    finally:
        trainer.close()
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def mode_skip_reason(device, compile_on: bool, recipe: str | None, smoke: bool) -> str:
    import torch

    if recipe is not None:
        if device.type != "cuda":
            return "float8 needs a CUDA GPU with compute capability >= 8.9"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return f"float8 needs compute capability >= 8.9 ({torch.cuda.get_device_name(device)} has less)"
    if compile_on and device.type != "cuda" and smoke:
        return "torch.compile on CPU takes ~50 s to compile even the tiny model; run without --smoke for it"
    return ""


def compare_losses(runs: dict, dtype_name: str) -> dict:
    eager, compiled = runs.get("eager"), runs.get("compile")
    if not (eager and compiled and eager["status"] == compiled["status"] == "ok"):
        return {"status": "skipped", "reason": "needs both the eager and the compile run"}
    rtol = LOSS_RTOL[dtype_name]
    worst = max(abs(a - b) / abs(b) for a, b in zip(compiled["losses"], eager["losses"]))
    return {"status": "ok" if worst <= rtol else "FAILED", "max_relative_difference": worst, "tolerance": rtol}


def _fsdp_worker(rank: int, overrides: list[str], store_path: str, results) -> None:
    import torch
    import torch.distributed as dist

    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
        result = train_mode("FSDP, 2 GPUs", overrides, 2)
        results.put((rank, "ok", result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "error", traceback.format_exc()[-2000:]))


def fsdp_check(device, overrides: list[str]) -> dict:
    import torch
    import torch.multiprocessing as mp

    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if visible < 2:
        return {"status": "skipped", "reason": f"needs 2 GPUs ({visible} visible)"}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        procs = [ctx.Process(target=_fsdp_worker, args=(r, overrides, os.path.join(tmp, "store"), results))
                 for r in range(2)]
        for p in procs:
            p.start()
        answers = {}
        try:
            while len(answers) < 2:
                rank, status, value = results.get(timeout=300)
                answers[rank] = (status, value)
        except Exception:  # noqa: BLE001 - a queue timeout: report what came back
            pass
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [v for s, v in answers.values() if s != "ok"]
    if errors or len(answers) < 2:
        return {"status": "FAILED", "reason": errors[0] if errors else "a rank gave no answer within 300 s"}
    return {**answers[0][1], "status": "ok"}


# ---------------------------------------------------------------------------------------------------------------

def format_table(report: dict) -> str:
    env = report["environment"]
    kind = "smoke" if report["smoke"] else "full"
    lines = [f"gpu_check ({kind}): " + ", ".join(f"{k} {v}" for k, v in env.items())]
    lines.append(f"{'check':<44} {'status':<8} detail")
    for row in report["attention"]:
        detail = (f"fwd {row['forward_error']:.1e}  grad {row['grad_error']:.1e}" if "forward_error" in row
                  else row.get("reason", ""))
        lines.append(f"{'attention ' + row['backend'] + ' ' + row['window']:<44} {row['status']:<8} {detail}")
    for row in report["training"]:
        if row["status"] == "ok":
            detail = (f"{row['tok_per_s']:,.0f} tok/s  MFU {100 * row['mfu']:.1f}%  peak {row['peak_memory_mib']:,.0f}"
                      f" MiB  attention {row['attention_backend']}  loss {row['losses'][-1]:.4f}")
        else:
            detail = row.get("reason", "")
        lines.append(f"{'d' + str(report['sizes']['depth']) + ' ' + row['mode']:<44} {row['status']:<8} {detail}")
    cmp = report["compile_vs_eager"]
    detail = (f"max relative loss difference {cmp['max_relative_difference']:.1e} (tolerance {cmp['tolerance']:g})"
              if "max_relative_difference" in cmp else cmp.get("reason", ""))
    lines.append(f"{'losses: compile vs eager':<44} {cmp['status']:<8} {detail}")
    fsdp = report["fsdp"]
    detail = f"loss {fsdp['losses'][-1]:.4f}" if fsdp["status"] == "ok" else fsdp.get("reason", "")
    lines.append(f"{'FSDP step on 2 GPUs':<44} {fsdp['status']:<8} {detail}")
    return "\n".join(lines)


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: any machine, about a minute")
    p.add_argument("--json", default="gpu_check.json", help="where to write the report")
    p.add_argument("--steps", type=int, default=None, help="training steps per mode")
    args = p.parse_args(argv)

    if args.smoke:  # float8 training needs none of torchao's compiled extensions; skip their load noise
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    import torch

    from titanlite.logging_utils import logger
    from titanlite.precision import resolve_compute_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_compute_dtype("auto", device.type)
    dtype_name = str(dtype).replace("torch.", "")
    sizes = dict(SMOKE if args.smoke else FULL)
    sizes["steps"] = args.steps or sizes["steps"]
    report = {"smoke": args.smoke, "json": args.json, "sizes": sizes, "compute_dtype": dtype_name,
              "environment": environment(device)}
    report["attention"] = attention_checks(device, dtype, sizes["attn_shape"])

    logger.setLevel(logging.WARNING)  # the trainer's own start-up lines would bury the table
    runs = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        base = _train_overrides(sizes, device.type, dtype_name, tmp)
        for name, compile_on, recipe in MODES:
            why = mode_skip_reason(device, compile_on, recipe, args.smoke)
            if why:
                runs[name] = {"mode": name, "status": "skipped", "reason": why}
                continue
            overrides = base + [f"--compile.enabled={'true' if compile_on else 'false'}"]
            if recipe:
                overrides += ["--float8.enabled=true", f"--float8.recipe={recipe}"]
            try:
                runs[name] = train_mode(name, overrides, sizes["steps"])
            except Exception as error:  # noqa: BLE001 - reported in the table
                runs[name] = {"mode": name, "status": "FAILED", "reason": f"{type(error).__name__}: {error}"[:300]}
        report["training"] = list(runs.values())
        report["compile_vs_eager"] = compare_losses(runs, dtype_name)
        report["fsdp"] = fsdp_check(device, base + ["--compile.enabled=true"])
    failed = [r for r in report["attention"] + report["training"] + [report["compile_vs_eager"], report["fsdp"]]
              if r["status"] == "FAILED"]
    report["passed"] = not failed
    return report


def main(argv: list[str] | None = None) -> int:
    report = run(sys.argv[1:] if argv is None else argv)
    print(format_table(report))
    path = report["json"]
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    print(f"report: {path} ({'all checks that ran passed' if report['passed'] else 'FAILED checks above'})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
