"""How much of a training step the optimizer takes (Muon + AdamW), for d4/d8 GPTs on CPU, 1 and 2 processes.

    python -m scripts.bench_optimizer                     # d4 and d8, 1 and 2 processes, fp32
    python -m scripts.bench_optimizer --depths 4 --procs 2 --dtype bfloat16

Each run builds the real titanlite GPT (FSDP2 per block + root when 2 processes, gloo), then times
forward+backward and `optimizers.step()` separately over a few steps after warm-up and prints the medians.
The global batch is fixed, so 2 processes each run half of it. Timings on shared CPUs are noisy (~2x).
Muon's cost is per step while forward+backward grows with tokens per step, so the share printed here (tiny CPU
batches) is far above what a real batch of 2^19 tokens sees; raise --batch-size/--seq-len to see it fall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from titanlite.config.sections import LRSchedulerConfig, OptimizerConfig
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.optim import build_optimizers


def _build(depth: int, opts, world_size: int):
    n_embd = depth * 64
    args = GPTArgs(n_layer=depth, n_embd=n_embd, n_head=n_embd // 128, n_kv_head=n_embd // 128, head_dim=128,
                   vocab_size=opts.vocab_size, sequence_len=opts.seq_len, window_pattern="L",
                   attention_backend="sdpa")
    with torch.device("meta"):
        model = GPT(args)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.init_buffers()
    model.init_weights()
    dtype = torch.bfloat16 if opts.dtype == "bfloat16" else torch.float32
    model.set_compute_dtype(dtype)
    plan = SimpleNamespace(batch_lr_scale=1.0, width_lr_scale=(n_embd / 768) ** -0.5, weight_decay_scaled=0.2,
                           num_iterations=1000)
    optimizers = build_optimizers(model.optimizer_param_groups(), OptimizerConfig(), plan, LRSchedulerConfig(),
                                  compute_dtype=dtype)
    return model, optimizers


def _measure(depth: int, opts, rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model, optimizers = _build(depth, opts, world_size)
    rows = opts.batch_size // world_size
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, opts.vocab_size, (opts.batch_size, opts.seq_len + 1), generator=gen)
    data = data[rank * rows:(rank + 1) * rows]
    fwd_bwd, opt = [], []
    for step in range(opts.warmup + opts.steps):
        t0 = time.perf_counter()
        model(data[:, :-1], data[:, 1:]).backward()
        t1 = time.perf_counter()
        optimizers.step(step)
        optimizers.zero_grad()
        t2 = time.perf_counter()
        if step >= opts.warmup:
            fwd_bwd.append(t1 - t0)
            opt.append(t2 - t1)
    f, o = statistics.median(fwd_bwd), statistics.median(opt)
    return {"depth": depth, "procs": world_size, "fwd_bwd_ms": 1e3 * f, "opt_ms": 1e3 * o,
            "share": o / (f + o), "orthogonalized_per_step": optimizers.muon.orthogonalized_matrices
            / (opts.warmup + opts.steps)}


def _worker(rank: int, world_size: int, store_path: str, out_path: str, opts) -> None:
    torch.set_num_threads(max(1, opts.threads // world_size))
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    results = [_measure(depth, opts, rank, world_size) for depth in opts.depths]
    if rank == 0:
        with open(out_path, "w") as f:  # a file, not a queue: nothing is lost when the worker hard-exits
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # avoids gloo's occasional SIGABRT at interpreter exit (docs/cpu_notes.md §1)


def _run_two(opts) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-optim-") as tmp:
        out_path = os.path.join(tmp, "results.json")
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "store"), out_path, opts), nprocs=2,
                           start_method="spawn")
        with open(out_path) as f:
            return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4, help="global sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads in total")
    opts = parser.parse_args(argv)
    rows = []
    if 1 in opts.procs:
        torch.set_num_threads(opts.threads)
        rows += [_measure(depth, opts, 0, 1) for depth in opts.depths]
    if 2 in opts.procs:
        rows += _run_two(opts)
    print(f"optimizer share of a step (batch {opts.batch_size}x{opts.seq_len}, vocab {opts.vocab_size}, "
          f"{opts.dtype}, median of {opts.steps} steps)")
    print(f"{'depth':>5} {'procs':>5} {'fwd+bwd ms':>11} {'optim ms':>9} {'share':>6} {'Muon mats/rank':>15}")
    for r in sorted(rows, key=lambda r: (r["depth"], r["procs"])):
        print(f"{r['depth']:>5} {r['procs']:>5} {r['fwd_bwd_ms']:>11.1f} {r['opt_ms']:>9.1f} {r['share']:>6.1%} "
              f"{r['orthogonalized_per_step']:>15.0f}")


if __name__ == "__main__":
    main()
