"""Training throughput of a config, variants side by side: tokens/s, MFU, step-time breakdown, memory, compile.

    python -m scripts.bench --job.config_file train_configs/debug_cpu.toml --compare compile,dtype,procs
    python -m scripts.bench --job.config_file train_configs/debug_cpu.toml \\
        --variant "window L: --model.window_pattern=L" --steps 4 --rounds 3 --json bench.json
    python -m scripts.bench --smoke --json out.json      # CI: tiny model, 2 steps
    python -m scripts.bench --job.config_file train_configs/debug_cpu.toml --variant "before@/tmp/old_checkout:"

Every variant runs in its own process group (1 process, or 2 for the `procs` comparison) built once; the
parent then runs them in interleaved rounds (A B A B ...) so machine noise hits all variants alike. Each step is
the trainer's own `Trainer.train_step` (no evaluation, no checkpoints); the data loaders and the optimizers are
wrapped with timers, so forward+backward = step - data wait - optimizer. Communication and the matmul /
non-matmul split come from one extra step under torch.profiler per variant. MFU divides by the trainer's own
peak: on CPU titanlite.cpu_peak's cached matmul peak for the variant's dtype and threads per process (measured
here before the variants start when it is missing), on GPU the peak-FLOPs table; the `mm chk%` column times a
matmul after each batch of steps against that peak, so a loaded machine shows.
Every option that is not a bench flag is a config override (`--section.key=value`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

COMPARISONS = ("compile", "dtype", "attention", "procs")
SMOKE_OVERRIDES = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=4", "--training.total_batch_size=256", "--data.vocab_size=512",
    "--compile.enabled=false", "--data.tokenizer_max_chars=400000",
]
# Self time of these ops is "matmul" in the profile split; attention kernels are counted apart.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm",
              "aten::addbmm")  # addmm_: the fused head accumulates its weight gradient in place
ATTENTION_MARKERS = ("scaled_dot_product", "flash_attention", "flex_attention", "flash_attn", "flashattn",
                     "flash_fwd", "flash_bwd", "flash::", "fmha", "sdpa")
COMM_MARKERS = ("c10d", "gloo", "nccl", "allgather", "all_gather", "reduce_scatter", "allreduce", "all_reduce",
                "record_param_comms")
# CUDA kernel names of GEMMs: cuBLAS (sm90_xmma_gemm_*, ampere_*gemm*, nvjet_*), CUTLASS, cuBLASLt's float8
# kernels, and inductor's Triton matmul templates (triton_tem_fused_mm_*, *_addmm_*, *_bmm_*)
GEMM_KERNEL_MARKERS = ("gemm", "xmma", "nvjet", "cutlass", "wgmma", "triton_tem_fused_mm", "triton_tem_fused_addmm",
                       "triton_tem_fused_bmm", "scaled_mm", "splitkreduce")


def classify_profile_row(name: str, kernel: bool) -> str:
    """matmul / attention / communication / other_ops for one profiler row (an op, or a CUDA kernel)."""
    lowered = name.lower()
    if any(m in lowered for m in COMM_MARKERS):
        return "communication"
    if any(m in lowered for m in ATTENTION_MARKERS):
        return "attention"
    if (not kernel and name in MATMUL_OPS) or (kernel and any(m in lowered for m in GEMM_KERNEL_MARKERS)):
        return "matmul"
    return "other_ops"


def split_profile(rows, on_gpu: bool) -> tuple[dict, list]:
    """({kind: seconds}, [(seconds, name)]) from profiler key_averages() rows, each second counted once.

    On CUDA a kernel's time shows twice: on its own (device) row and as the self device time of the aten op
    that launched it, so only the kernel rows are counted, classified by kernel name (GEMMs by the
    cuBLAS/CUTLASS/Triton names above). On CPU the ops' self CPU time is the work.
    """
    from torch.autograd import DeviceType

    split = {"matmul": 0.0, "attention": 0.0, "communication": 0.0, "other_ops": 0.0}
    top = []
    for row in rows:
        if on_gpu:
            if row.device_type != DeviceType.CUDA:
                continue
            seconds = row.self_device_time_total / 1e6
        else:
            seconds = row.self_cpu_time_total / 1e6
        if seconds <= 0:
            continue
        split[classify_profile_row(row.key, kernel=on_gpu)] += seconds
        top.append((seconds, row.key))
    top.sort(reverse=True)
    return split, top


@dataclass
class Variant:
    name: str
    overrides: list[str] = field(default_factory=list)
    processes: int = 1
    code_root: str = ""  # another checkout of titanlite to import instead of this one (before/after a change)


# ---------------------------------------------------------------------------------------------------------------
# worker side: one process of one variant

class _TimedLoader:
    """Stands in for a train stream inside Trainer.train_step: same batches, the wait is added to a clock."""

    def __init__(self, loader, clock: dict, sync):
        self.loader, self.clock, self.sync = loader, clock, sync

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.loader)
        self.sync()
        self.clock["data"] += time.perf_counter() - start
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _TimedOptimizers:
    def __init__(self, optimizers, clock: dict, sync):
        self.optimizers, self.clock, self.sync = optimizers, clock, sync

    def step(self, step_index: int) -> None:
        self.sync()  # the backward's queued GPU work belongs to forward+backward, not to the optimizer
        start = time.perf_counter()
        self.optimizers.step(step_index)
        self.sync()
        self.clock["optimizer"] += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.optimizers, name)


def _matmul_check(device, compute_dtype, size: int) -> float | None:
    """A quick matmul FLOP/s of this process after a batch of steps (CPU): a check of how loaded the machine was,
    against the peak the MFU divides by; None on GPU. Up to size x size (smaller for an emulated dtype)."""
    if device.type == "cuda":
        return None
    from titanlite.cpu_peak import measure_matmul_peak

    return measure_matmul_peak(compute_dtype, min_trials=3, min_seconds=0.3, largest=size)


def _profile_step(trainer, step: int, sync) -> dict:
    """One train step under torch.profiler: seconds of matmul, attention, communication and other ops."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        trainer.train_step(step)
        sync()
    wall = time.perf_counter() - start
    split, top = split_profile(prof.key_averages(), on_gpu)
    counted = sum(split.values())
    # On CPU the ops run on this thread, so what they do not cover is Python/framework overhead.
    result = {f"{k}_s": v for k, v in split.items()}
    result.update(wall_s=wall, untracked_s=max(0.0, wall - counted) if not on_gpu else None,
                  non_matmul_share=1.0 - split["matmul"] / counted if counted else None,
                  top_ops=[{"op": n, "s": round(s, 4)} for s, n in top[:12]])
    return result


def _worker(rank: int, world: int, argv: list[str], store_path: str, commands, results, threads: int,
            code_root: str = "", peak_size: int = 2048) -> None:
    import gc

    if code_root:  # nothing of titanlite is imported yet in this fresh process
        sys.path.insert(0, os.path.abspath(code_root))

    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    import torch
    import torch.distributed as dist

    exit_code = 0
    try:
        # the cores are split between the processes of a variant (torchrun's OMP_NUM_THREADS does the same)
        torch.set_num_threads(threads if threads > 0 else max(1, (os.cpu_count() or world) // world))
        if world > 1:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                              LOCAL_WORLD_SIZE=str(world))
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world)
        from titanlite.config import load_config
        from titanlite.metrics import peak_memory_mib
        from titanlite.train import Trainer

        config = load_config(argv)
        trainer = Trainer(config)
        sync = (lambda: torch.cuda.synchronize(trainer.device)) if trainer.device.type == "cuda" else (lambda: None)
        clock = {"data": 0.0, "optimizer": 0.0}
        trainer.train_streams = {k: _TimedLoader(v, clock, sync) for k, v in trainer.train_streams.items()}
        trainer.optimizers = _TimedOptimizers(trainer.optimizers, clock, sync)
        info = {"compute_dtype": str(trainer.compute_dtype).replace("torch.", ""),
                "attention_backend": getattr(trainer.model, "attention_backend", "n/a"),
                "threads": torch.get_num_threads(), "device": trainer.device_info.line,
                "tokens_per_step": trainer.plan.total_batch_size, "flops_per_token": trainer.plan.flops_per_token,
                "grad_accum_steps": trainer.plan.grad_accum_steps, "peak_flops": trainer.device_info.peak_flops,
                "rss_after_build_mib": peak_memory_mib(trainer.device)}
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        results.put((rank, "ready", info))
        step = 0
        while True:
            command, arg = commands.get()
            if command == "stop":
                break
            if command == "profile":
                results.put((rank, "profile", _profile_step(trainer, step, sync)))
                step += 1
                continue
            records = []
            for _ in range(arg):
                clock["data"] = clock["optimizer"] = 0.0
                sync()
                start = time.perf_counter()
                loss = trainer.train_step(step)
                sync()
                total = time.perf_counter() - start
                records.append({"step": step, "total": total, "data": clock["data"], "optimizer": clock["optimizer"],
                                "loss": float(loss)})
                if step == 0:  # the trainer's GC policy after the first step
                    gc.collect()
                    gc.freeze()
                    gc.disable()
                step += 1
            # a matmul check after every batch of steps, every rank at once as in training: how much of the peak
            # the machine gave this variant's processes during the run (a low figure means the run was loaded)
            if world > 1:
                dist.barrier()
            results.put((rank, "steps", {"records": records, "peak_memory_mib": peak_memory_mib(trainer.device),
                                         "matmul_check": _matmul_check(trainer.device, trainer.compute_dtype,
                                                                       peak_size)}))
        trainer.close()
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, "error", traceback.format_exc()))
        exit_code = 1
    if world > 1 and dist.is_initialized():
        try:
            if exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    results.close()
    results.join_thread()  # os._exit would drop what the queue's feeder thread has not sent yet (an error report)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # gloo's exit-time abort (docs/cpu_notes.md §1) must not turn a good run into a failure


# ---------------------------------------------------------------------------------------------------------------
# parent side

class VariantGroup:
    """The live processes of one variant, driven by commands; every rank answers each command."""

    def __init__(self, ctx, variant: Variant, argv: list[str], tmp: str, timeout: float, threads: int,
                 peak_size: int):
        self.variant, self.timeout = variant, timeout
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(variant.processes)]
        store = os.path.join(tmp, f"store-{id(self)}")
        self.procs = [ctx.Process(target=_worker, args=(r, variant.processes, argv, store, self.commands[r],
                                                        self.results, threads, variant.code_root, peak_size),
                                 daemon=True)
                      for r in range(variant.processes)]
        for p in self.procs:
            p.start()

    def _collect(self, kind: str) -> list:
        answers = {}
        deadline = time.time() + self.timeout
        while len(answers) < len(self.procs):
            try:
                rank, got, payload = self.results.get(timeout=max(1.0, deadline - time.time()))
            except Exception:
                raise RuntimeError(f"variant {self.variant.name!r}: no answer within {self.timeout:.0f}s") from None
            if got == "error":
                raise RuntimeError(f"variant {self.variant.name!r} rank {rank} failed:\n{payload}")
            answers[rank] = payload
        assert got == kind, (got, kind)
        return [answers[r] for r in sorted(answers)]

    def ready(self) -> list:
        return self._collect("ready")

    def send(self, command: str, arg=None) -> list:
        for q in self.commands:
            q.put((command, arg))
        return self._collect({"run": "steps", "profile": "profile"}[command])

    def stop(self) -> None:
        for q in self.commands:
            q.put(("stop", None))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def build_variants(compare: list[str], extra: list[str], native_bf16: bool, base_argv: list[str]):
    """Variants for --compare and --variant; returns (variants, skipped [{name, reason}])."""
    variants, skipped = [Variant("baseline")], []
    for what in compare:
        if what == "compile":
            variants[0].overrides.append("--compile.enabled=false")
            variants.append(Variant("compile", ["--compile.enabled=true"]))
        elif what == "dtype":
            variants[0].overrides.append("--training.dtype=float32")
            if native_bf16:
                variants.append(Variant("bf16", ["--training.dtype=bfloat16"]))
            else:
                skipped.append({"name": "bf16", "reason": "no native bf16 on this device (emulated bf16 matmuls are "
                                                          "~100x slower than fp32; not benchmarked)"})
        elif what == "attention":
            variants.extend(_attention_variants(base_argv, skipped))
        elif what == "procs":
            variants.append(Variant("2 processes", [], processes=2))
        else:
            raise SystemExit(f"error: --compare {what!r} is unknown; choose from {', '.join(COMPARISONS)}")
    for spec in extra:
        name, _, overrides = spec.partition(":")
        name, _, root = name.partition("@")
        if root and not os.path.isdir(os.path.join(root.strip(), "titanlite")):
            raise SystemExit(f"error: --variant {spec!r}: {root.strip()} holds no titanlite package")
        variants.append(Variant(name.strip(), shlex.split(overrides), code_root=root.strip()))
    return variants, skipped


def _attention_variants(base_argv: list[str], skipped: list) -> list[Variant]:

    from titanlite.attention import BACKENDS, backend_available
    from titanlite.config import load_config
    from titanlite.device import resolve_device_type
    from titanlite.precision import resolve_compute_dtype

    config = load_config(base_argv)
    device_type = resolve_device_type(config.training.device_type)
    dtype = resolve_compute_dtype(config.training.dtype, device_type)
    out = []
    for name in BACKENDS:
        ok, why = backend_available(name, device_type, dtype)
        if ok:
            out.append(Variant(f"attn {name}", [f"--model.attention_backend={name}"]))
        else:
            skipped.append({"name": f"attn {name}", "reason": why})
    return out


def _adjust_for_processes(argv: list[str], processes: int) -> list[str]:
    """Keep the global batch with N processes: halve device_batch_size when the split does not divide."""
    if processes == 1:
        return argv
    from titanlite.config import load_config

    config = load_config(argv)
    t = config.training
    batch = t.total_batch_size if t.total_batch_size > 0 else None
    dbs = t.device_batch_size
    if batch is not None and batch % (dbs * config.model.max_seq_len * processes):
        dbs = max(1, dbs // processes)
    return argv + [f"--training.device_batch_size={dbs}", "--parallelism.world_size=-1"]


def summarize(variant: Variant, infos: list, step_answers: list[list], profile: list | None, warmup: int,
              peak_source: str) -> dict:
    info = infos[0]
    # the step time of a variant is its slowest rank's (they wait for each other at every collective)
    timed, first = [], []
    per_rank_records = [sum((a[r]["records"] for a in step_answers), []) for r in range(len(infos))]
    for i, rec in enumerate(per_rank_records[0]):
        rows = [recs[i] for recs in per_rank_records]
        slowest = max(rows, key=lambda x: x["total"])
        (first if rec["step"] < warmup else timed).append(slowest)
    step_time = statistics.median(r["total"] for r in timed)
    data = statistics.median(r["data"] for r in timed)
    optimizer = statistics.median(r["optimizer"] for r in timed)
    tokens = info["tokens_per_step"]
    flops_per_sec = info["flops_per_token"] * tokens / step_time
    # the trainer's own MFU denominator (the same number its step line divides by), summed over processes
    peak = sum(i["peak_flops"] for i in infos)
    checks = [a[r]["matmul_check"] for a in step_answers for r in range(len(infos))]
    checks = [c / infos[0]["peak_flops"] for c in checks if c is not None]
    comm = profile[0]["communication_s"] if profile else None
    memory = max(a[r]["peak_memory_mib"] for a in step_answers for r in range(len(infos)))
    result = {
        "name": variant.name, "overrides": variant.overrides, "processes": variant.processes,
        "code_root": variant.code_root or None,
        "threads_per_process": info["threads"], "compute_dtype": info["compute_dtype"],
        "attention_backend": info["attention_backend"], "device": info["device"],
        "tokens_per_step": tokens, "grad_accum_steps": info["grad_accum_steps"],
        "flops_per_token": info["flops_per_token"], "steps_timed": len(timed),
        "step_times_s": [round(r["total"], 4) for r in timed], "step_time_s": step_time,
        "tokens_per_sec": tokens / step_time, "flops_per_sec": flops_per_sec,
        "peak_flops": peak, "peak_flops_source": peak_source, "mfu": flops_per_sec / peak,
        "matmul_check_vs_peak": [round(min(checks), 3), round(max(checks), 3)] if checks else None,
        "breakdown": {"data": data, "forward_backward": max(0.0, step_time - data - optimizer),
                      "optimizer": optimizer, "communication": comm},
        "first_step_s": first[0]["total"] if first else None,
        "compile_time_s": max(0.0, first[0]["total"] - step_time) if first else None,
        "peak_memory_mib": memory, "rss_after_build_mib": max(i["rss_after_build_mib"] for i in infos),
        # each rank returns its share (local token-loss sum / global tokens): the step's loss is their sum
        "final_loss": sum(recs[-1]["loss"] for recs in per_rank_records),
        "profile": profile[0] if profile else None,
    }
    return result


def format_table(report: dict) -> str:
    head = (f"{'variant':<16} {'procs':>5} {'dtype':>8} {'tok/s':>9} {'MFU%':>6} {'step ms':>8} {'data':>6} "
            f"{'fwd+bwd':>8} {'optim':>6} {'comm':>6} {'non-mm%':>7} {'1st s':>6} {'compile s':>9} {'peak MiB':>8} "
            f"{'mm chk%':>8}")
    lines = [head, "-" * len(head)]
    ms = lambda v: f"{1000 * v:.0f}" if v is not None else "n/a"  # noqa: E731
    for v in report["variants"]:
        b, prof = v["breakdown"], v["profile"] or {}
        share = prof.get("non_matmul_share")
        lines.append(
            f"{v['name']:<16} {v['processes']:>5} {v['compute_dtype']:>8} {v['tokens_per_sec']:>9,.0f} "
            f"{100 * v['mfu']:>6.1f} {ms(v['step_time_s']):>8} {ms(b['data']):>6} {ms(b['forward_backward']):>8} "
            f"{ms(b['optimizer']):>6} {ms(b['communication']):>6} "
            f"{(f'{100 * share:.1f}' if share is not None else 'n/a'):>7} "
            f"{(v['first_step_s'] or 0):>6.1f} {(v['compile_time_s'] or 0):>9.1f} {v['peak_memory_mib']:>8.0f} "
            f"{(f'{100 * check[0]:.0f}-{100 * check[1]:.0f}' if (check := v['matmul_check_vs_peak']) else 'n/a'):>8}")
    for s in report["skipped"]:
        lines.append(f"{s['name']:<16} skipped: {s['reason']}")
    m = report["machine"]
    lines.append(f"CPU {m['cpu']} [{m['isa']}], load average {m['load_start']} at start, {m['load_end']} at end")
    for source in dict.fromkeys(v["peak_flops_source"] for v in report["variants"]):
        lines.append(f"MFU vs {source}")
    lines.append("mm chk%: a matmul timed after each batch of steps, as % of that peak (low: the machine was busy)")
    return "\n".join(lines)


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (A B A B ...)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per variant (compile happens here)")
    p.add_argument("--compare", default="", help=f"comma list of {', '.join(COMPARISONS)}")
    p.add_argument("--variant", action="append", default=[],
                   help='extra variant "NAME: --section.key=value ..." (repeatable); "NAME@DIR: ..." imports '
                        'titanlite from the checkout DIR instead (before/after comparisons)')
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (0: the cores divided by the variant's processes)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step (matmul/comm split)")
    p.add_argument("--smoke", action="store_true", help="CI mode: tiny model, 1 warm-up + 2 steps, one round")
    p.add_argument("--json", default="", help="also write the JSON report to this file")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a variant may take to answer")
    return p.parse_known_args(argv)


def prepare_data(data_cfg) -> None:
    """Corpus shards and tokenizer once, here: variants start together and must not race to build them."""
    from titanlite.data.corpora import prepare_corpus, prepare_tokenizer

    prepare_corpus(data_cfg)
    prepare_tokenizer(data_cfg)


def run(argv: list[str]) -> dict:
    import torch.multiprocessing as mp

    from titanlite.device import resolve_device_type
    from titanlite.config import load_config
    from titanlite.precision import has_native_bf16

    args, overrides = parse_args(argv)
    if args.smoke:
        overrides = SMOKE_OVERRIDES + overrides
        args.steps, args.rounds, args.warmup = 2, 1, 1
    # the matmul check after each batch of steps; smoke (CI): 512 x 512, a tenth of the time
    peak_size = 512 if args.smoke else 2048
    with tempfile.TemporaryDirectory(prefix="titanlite-bench-") as tmp:
        base = overrides + [f"--job.dump_folder={tmp}", "--checkpoint.enabled=false", "--metrics.tensorboard=false",
                            "--metrics.run=dummy", "--eval.eval_every=-1", "--eval.core_metric_every=-1",
                            "--eval.sample_every=-1"]
        config = load_config(base)  # fail early, in the parent, on a bad config
        prepare_data(config.data)
        native = has_native_bf16(resolve_device_type(config.training.device_type))
        compare = [c.strip() for c in args.compare.split(",") if c.strip()]
        variants, skipped = build_variants(compare, args.variant, native, base)
        peaks = measure_machine_peaks(variants, base, args.threads)
        load_start = os.getloadavg()
        ctx = mp.get_context("spawn")
        groups = []
        try:
            for i, v in enumerate(variants):
                # a run folder each: variants run at once, and a run folder admits one run (titanlite.run_lock)
                own_folder = [f"--job.dump_folder={os.path.join(tmp, f'variant-{i}')}"]
                if peaks[i][0]:
                    own_folder += [f"--metrics.peak_flops={peaks[i][0]}", "--metrics.remeasure_peak=false"]
                groups.append(VariantGroup(ctx, v, _adjust_for_processes(base + v.overrides + own_folder,
                                                                         v.processes), tmp,
                                           args.timeout, args.threads, peak_size))
            infos = [g.ready() for g in groups]
            answers = [[g.send("run", args.warmup)] if args.warmup else [] for g in groups]
            for _ in range(args.rounds):
                for i, g in enumerate(groups):  # A B A B: noise is shared by all variants
                    answers[i].append(g.send("run", args.steps))
            profiles = [None if args.no_profile else g.send("profile") for g in groups]
        finally:
            for g in groups:
                g.stop()
        load_end = os.getloadavg()
    import torch

    from titanlite.cpu_peak import cpu_isa, cpu_name

    report = {
        "config": config.job.config_file, "overrides": overrides,
        "machine": {"cpu": cpu_name(), "isa": cpu_isa(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "native_bf16": native,
                    "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in load_end]},
        "steps_per_round": args.steps, "rounds": args.rounds, "warmup": args.warmup,
        "variants": [summarize(v, infos[i], answers[i], profiles[i], args.warmup, peaks[i][1])
                     for i, v in enumerate(variants)],
        "skipped": skipped,
    }
    return report


def measure_machine_peaks(variants: list[Variant], base: list[str], threads: int) -> list[tuple[str, str]]:
    """Per variant: (the --metrics.peak_flops override for its processes, or "" on GPU; where the number is from).

    On CPU the MFU denominator is titanlite.cpu_peak's, the number the trainer's own step line divides by:
    cached per (CPU, instruction set, dtype, threads), and when missing measured here, before any variant starts,
    so that no variant measures it while another one builds or computes (that once cached a peak 4x too low).
    """
    import torch

    from titanlite.config import load_config
    from titanlite.cpu_peak import cpu_peak_flops
    from titanlite.device import resolve_device_type
    from titanlite.precision import resolve_compute_dtype

    saved_threads, done, out = torch.get_num_threads(), {}, []
    try:
        for v in variants:
            config = load_config(base + v.overrides)
            device_type = resolve_device_type(config.training.device_type)
            procs = f", x {v.processes} processes" if v.processes > 1 else ""
            if device_type != "cpu":
                out.append(("", f"peak-FLOPs table (BF16){procs}"))
                continue
            dtype = resolve_compute_dtype(config.training.dtype, device_type)
            per_process = threads if threads > 0 else max(1, (os.cpu_count() or v.processes) // v.processes)
            key = (dtype, per_process, config.metrics.peak_flops)
            if key not in done:
                torch.set_num_threads(per_process)
                done[key] = cpu_peak_flops(dtype, config.metrics.peak_flops, config.metrics.remeasure_peak)
            peak = done[key]
            out.append((repr(peak.flops), f"{str(dtype).removeprefix('torch.')} matmul peak, {per_process} "
                                          f"thread{'s' if per_process > 1 else ''} per process ({peak.source}){procs}"))
    finally:
        torch.set_num_threads(saved_threads)
    return out


def main(argv: list[str]) -> int:
    report = run(argv)
    print(format_table(report))
    text = json.dumps(report, indent=2, default=float)
    print("JSON:")
    print(text)
    args, _ = parse_args(argv)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    from titanlite.cli import run_cli

    sys.exit(run_cli(main))
