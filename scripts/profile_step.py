"""Where a training step's time goes, by kind of work: matmuls, attention, casts, norms, the head, the optimizer.

    python -m scripts.profile_step --job.config_file train_configs/bench_cpu_d4.toml --training.dtype=bfloat16
    python -m scripts.profile_step --job.config_file train_configs/debug_cpu.toml --steps 3 --top 20

Builds the trainer from the config (every option that is not a flag below is a config override), runs warm-up
steps, then profiles the next steps with torch.profiler and attributes each op's self CPU time to one bucket:

- optimizer: everything under the optimizer step; data: waiting for the loader
- head: everything the fused softcap + cross-entropy head does (forward and its gradient are formed together)
- attention: the SDPA / flex / flash kernels, forward and backward
- matmul: the blocks' and embeddings' matmuls (mm / addmm / bmm), forward and backward
- casts: dtype conversions (aten::to / _to_copy and the copies under them), e.g. fp32 master weight -> bf16
- norm / rope / relu^2 / ...: the other forward and backward ops, named by the autograd node or op that ran them

The step's wall time minus the ops is Python and framework overhead ("untracked"). CPU only: on a GPU the self
CPU time is the launch cost, not the work (scripts/bench.py splits kernel time there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

from scripts.bench import ATTENTION_MARKERS, MATMUL_OPS  # the same split of ops the bench's profile makes

CAST_OPS = {"aten::to", "aten::_to_copy"}
OPTIMIZER_LABEL, DATA_LABEL, HEAD_LABEL = "titanlite::optimizer", "titanlite::data", "titanlite::head"
# autograd node / custom-function names -> a readable bucket (the rest keep their op name)
NAMED_NODES = (("RmsNorm", "norm"), ("Rotary", "rope"), ("ReluSquared", "relu^2"), ("Embedding", "embedding"),
               ("ScaledSum", "residual mix"), ("Smear", "smear"), ("GatedAdd", "gates"),
               ("Sigmoid", "gates (sigmoid)"), ("Cat", "smear (cat)"))


def bucket_of(event) -> str:
    """The bucket of one profiler event's self time, from its own name and its ancestors'."""
    names = []
    node = event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    for label, bucket in ((OPTIMIZER_LABEL, "optimizer"), (DATA_LABEL, "data"), (HEAD_LABEL, "head")):
        if label in names:
            return bucket
    if any(m in n.lower() for n in names for m in ATTENTION_MARKERS):
        return "attention"
    if event.name in MATMUL_OPS:
        return "matmul"
    if any(n in CAST_OPS for n in names):
        return "casts"
    for n in names:
        for marker, bucket in NAMED_NODES:
            if marker in n:
                return bucket
    backward = next((n for n in names if n.startswith("autograd::engine::evaluate_function: ")), None)
    if backward is not None:
        return "bwd " + backward.split(": ", 1)[1].rstrip("0123456789")
    return event.name


def attribute(events) -> tuple[dict, dict, dict]:
    """({bucket: seconds}, {op name: seconds}, {(bucket, op name): seconds}) of self CPU time over the events."""
    buckets, ops, pairs = defaultdict(float), defaultdict(float), defaultdict(float)
    for event in events:
        seconds = event.self_cpu_time_total / 1e6
        if seconds <= 0 or event.name.startswith("titanlite::"):
            continue
        bucket = bucket_of(event)
        buckets[bucket] += seconds
        ops[event.name] += seconds
        pairs[bucket, event.name] += seconds
    return dict(buckets), dict(ops), dict(pairs)


class _Labelled:
    """Wraps the trainer's loaders / optimizers so their work is recorded under one label."""

    def __init__(self, inner, method: str, label: str):
        self._inner, self._method, self._label = inner, method, label

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name != self._method:
            return value
        from torch.profiler import record_function

        def labelled(*args, **kwargs):
            with record_function(self._label):
                return value(*args, **kwargs)
        return labelled

    def __next__(self):
        from torch.profiler import record_function

        with record_function(self._label):
            return next(self._inner)


def _label_head(model) -> bool:
    """Record the head's forward under HEAD_LABEL; False where it cannot be (no lm_head, or a whole-model
    compile: Dynamo drops record_function, and the head's ops are fused into the model's graphs anyway)."""
    from torch.profiler import record_function

    head = getattr(model, "lm_head", None)
    if head is None or getattr(model, "_compiled_call_impl", None) is not None:
        return False
    ranges = []
    head.register_forward_pre_hook(lambda *_: ranges.append(record_function(HEAD_LABEL).__enter__()))
    head.register_forward_hook(lambda *_: ranges.pop().__exit__(None, None, None))
    return True


def format_report(buckets: dict, ops: dict, pairs: dict, wall: float, steps: int, tokens: int, top: int) -> str:
    counted = sum(buckets.values())
    lines = [f"{steps} profiled step(s): {wall / steps * 1e3:.1f} ms/step wall, {tokens * steps / wall:,.0f} tok/s "
             "(profiler overhead included)", "", f"{'bucket':<28}{'ms/step':>10}{'share':>8}"]
    rows = sorted(buckets.items(), key=lambda kv: -kv[1])
    rows.append(("untracked (Python, framework)", max(0.0, wall - counted)))
    for name, seconds in rows:
        lines.append(f"{name[:27]:<28}{seconds / steps * 1e3:>10.1f}{seconds / wall:>8.1%}")
    lines += ["", f"top {top} ops by self time", f"{'op':<40}{'ms/step':>10}{'share':>8}"]
    for name, seconds in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{name[:39]:<40}{seconds / steps * 1e3:>10.1f}{seconds / wall:>8.1%}")
    lines += ["", "the ops of the five largest buckets (ms/step)"]
    for bucket, _ in rows[:5]:
        inside = sorted(((sec, op) for (b, op), sec in pairs.items() if b == bucket), reverse=True)[:6]
        lines.append(f"{bucket}: " + ", ".join(f"{op.replace('aten::', '')} {sec / steps * 1e3:.1f}"
                                               for sec, op in inside))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (compile happens here)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--top", type=int, default=15, help="how many ops to list")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args, overrides = p.parse_known_args(argv)
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from titanlite.config import load_config
    from titanlite.cpu_peak import cpu_isa
    from titanlite.train import Trainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    trainer = Trainer(load_config(overrides))
    if trainer.device.type != "cpu":
        print("profile_step: CPU only (on a GPU use scripts/bench.py's kernel split)", file=sys.stderr)
        return 2
    trainer.train_streams = {k: _Labelled(v, "__next__", DATA_LABEL) for k, v in trainer.train_streams.items()}
    trainer.optimizers = _Labelled(trainer.optimizers, "step", OPTIMIZER_LABEL)
    head_labelled = _label_head(trainer.model)
    step = 0
    for step in range(args.warmup):
        trainer.train_step(step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            trainer.train_step(step)
        wall = time.perf_counter() - start
    buckets, ops, pairs = attribute(prof.events())
    print(f"CPU [{cpu_isa()}], {torch.get_num_threads()} threads, compute dtype "
          f"{str(trainer.compute_dtype).replace('torch.', '')}, load average {os.getloadavg()[0]:.2f}")
    if not head_labelled:
        print("(whole-model compile: the head's work is inside the compiled graphs, not a bucket of its own)")
    print(format_report(buckets, ops, pairs, wall, args.steps, trainer.plan.total_batch_size, args.top))
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
