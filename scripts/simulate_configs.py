"""Simulate one training step of every shipped GPU config at 8, 64 (FSDP and HSDP 8 x 8) and 1,024 (HSDP 128 x 8)
ranks and print one line per case: simulated per-rank peak, the planner's eager estimate, their gap, the time.

    python scripts/simulate_configs.py [--worlds 8,64,64x8,1024x128] [--configs d12,d20,...] [--micro-steps N]

A case that fails prints its one-line error and the rest go on; the exit code is the number of failures.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from titanlite.config import load_config
from titanlite.errors import UserError
from titanlite.models import get_train_spec
from titanlite.scaling import derive_plan
from titanlite.simulate import GIB, simulate_step

CONFIGS = {
    "d12": ["--job.config_file", "d12.toml"],
    "d20": ["--job.config_file", "d20.toml"],
    "gpt2_d26": ["--job.config_file", "gpt2_d26.toml"],
    "speedrun_d24": ["--job.config_file", "speedrun_d24.toml"],
    "llama_d20": ["--job.config_file", "d20.toml", "--model.name=llama"],
}
WORLDS = {"8": (8, 1), "64": (64, 1), "64x8": (64, 8), "1024x128": (1024, 128), "1024": (1024, 1)}
DEFAULT_WORLDS = "8,64,64x8,1024x128"


def estimate_bytes(config, world: int, shard: int, plan) -> int | None:
    spec = get_train_spec(config.model.name)
    if spec.estimate_memory is None:
        return None
    est = spec.estimate_memory(plan, 2, shard, config.activation_checkpoint.mode,
                               config.activation_checkpoint.selective_every, compiled=False)
    return est.total_ac if config.activation_checkpoint.mode != "none" else est.total


def run_case(name: str, argv: list[str], world: int, replicate: int, micro_steps: int | None, rank: int = 0) -> str:
    config = load_config(argv + [f"--parallelism.dp_replicate={replicate}"])
    spec = get_train_spec(config.model.name)
    plan = derive_plan(config.model, config.training, config.optimizer, config.data.vocab_size, world, spec)
    result = simulate_step(config, world, micro_steps=micro_steps, rank=rank)
    est = estimate_bytes(config, world, result.dp_shard, plan)
    gap = f"{(est - result.peak_bytes) / result.peak_bytes:+6.1%}" if est else "   n/a"
    mesh = f"HSDP {replicate}x{world // replicate}" if replicate > 1 else f"FSDP {world}"
    est_text = f"{est / GIB:7.2f}" if est else "    n/a"
    owned = sum(result.muon_owned.values())  # matrices this rank orthogonalises
    return (f"{name:<13} {mesh:<14} rank {rank:>4} batch {plan.device_batch_size:>2} x {result.micro_steps}/{plan.grad_accum_steps:<2}"
            f" peak {result.peak_bytes / GIB:7.2f} GiB  estimate {est_text} GiB  gap {gap}  "
            f"units {len(result.fsdp_units):>3}  muon owned {owned:>3}  {result.seconds:6.1f} s"
            + (f"  [{plan.batch_note}]" if plan.batch_note else ""))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default=DEFAULT_WORLDS, help=f"of {', '.join(WORLDS)} (NxR: HSDP, R replicas)")
    p.add_argument("--rank", default="0", help="the rank to simulate: a number, or 'last'")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--micro-steps", type=int, default=0, help="cap on micro-steps (0: the full step)")
    args = p.parse_args(argv)
    failures = 0
    for name in args.configs.split(","):
        for world_name in args.worlds.split(","):
            world, replicate = WORLDS[world_name]
            try:
                rank = world - 1 if args.rank == "last" else int(args.rank)
                line = run_case(name, CONFIGS[name], world, replicate, args.micro_steps or None, rank)
            except UserError as exc:
                failures += 1
                line = f"{name:<13} world {world_name}: error: {exc}"
            except Exception as exc:  # noqa: BLE001 - a broken case is reported, the others still run
                failures += 1
                last = traceback.extract_tb(exc.__traceback__)[-1]
                line = (f"{name:<13} world {world_name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        f" at {last.filename}:{last.lineno}")
            print(line, flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
