"""Evaluate a saved checkpoint: train/val bits per byte, CORE (CSV per task + final row) and samples.

    python -m scripts.base_eval --run-dir outputs/d12                       # latest step, everything
    torchrun --nproc_per_node=8 -m scripts.base_eval --run-dir outputs/d24 --step 5568 --max-per-task -1
    python -m scripts.base_eval --run-dir outputs/d4 --eval bpb,samples --split-tokens 65536

Works on any number of processes (DCP reshards the checkpoint). The model is rebuilt from the config stored
in the checkpoint, so no other flags are needed. CORE scores prompts whole up to the model's RoPE table
(10 x T) in the reference's dtype (bf16 on CUDA, fp32 on CPU), and its line says so; --core-dtype and
--core-crop-to-seq-len override the checkpoint's eval.core_dtype / eval.core_crop_to_seq_len.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from titanlite.assemble import assemble_model
from titanlite.checkpoint import CheckpointManager, read_meta
from titanlite.config import build_config, config_from_toml_text
from titanlite.data.corpora import prepare_tokenizer, resolve_data_dir
from titanlite.data.loader import build_loader
from titanlite.device import resolve_device_type
from titanlite.distributed import init_distributed
from titanlite.errors import UserError
from titanlite.eval.bpb import evaluate_bpb
from titanlite.eval.core import core_line, core_settings, evaluate_core, resolve_core_dtype, write_core_csv
from titanlite.eval.samples import sample_completions
from titanlite.generate import generate
from titanlite.logging_utils import init_logger, logger
from titanlite.models import get_train_spec
from titanlite.paths import cache_dir
from titanlite.precision import resolve_compute_dtype
from titanlite.scaling import derive_plan
from titanlite.train import cli_entry

DEFAULT_SPLIT_TOKENS = 40 * 2**19  # the reference's base_eval default (20,971,520)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="run folder holding step-NNNNNN/ checkpoints")
    parser.add_argument("--step", default="latest", help="checkpoint step to evaluate (default: latest)")
    parser.add_argument("--eval", default="bpb,core,samples", help="comma list of bpb, core, samples")
    parser.add_argument("--split-tokens", type=int, default=DEFAULT_SPLIT_TOKENS, help="tokens per bpb split")
    parser.add_argument("--device-batch-size", type=int, default=0, help="rows per forward (0: as trained)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1: all)")
    parser.add_argument("--bundle", type=Path, default=None, help="CORE bundle folder (default: the config's)")
    parser.add_argument("--device-type", default="", help="cuda, cpu or mps ('' autodetects)")
    parser.add_argument("--core-dtype", choices=("auto", "bfloat16", "float32"), default=None,
                        help="CORE compute dtype (default: the checkpoint's eval.core_dtype; auto = bf16 on CUDA, "
                             "fp32 on CPU)")
    parser.add_argument("--core-crop-to-seq-len", choices=("true", "false"), default=None,
                        help="left-crop CORE prompts to the training context (default: the checkpoint's "
                             "eval.core_crop_to_seq_len)")
    return parser.parse_args(argv)


def _load_model(run_dir: Path, step_arg: str, args, world, wanted: set[str]):
    probe = CheckpointManager(build_config(None, []).checkpoint, run_dir, world)
    step = probe.resolve_step("latest" if step_arg == "latest" else int(step_arg))
    meta = read_meta(probe.step_dir(step))
    if not meta.get("config_toml"):
        raise UserError(f"{probe.step_dir(step)}/meta.json holds no config; cannot rebuild the model")
    config = config_from_toml_text(meta["config_toml"])
    overrides = {}
    if args.core_dtype is not None:
        overrides["core_dtype"] = args.core_dtype
    if args.core_crop_to_seq_len is not None:
        overrides["core_crop_to_seq_len"] = args.core_crop_to_seq_len == "true"
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, **overrides))
    dbs = args.device_batch_size or config.training.device_batch_size
    training = dataclasses.replace(config.training, device_batch_size=dbs, num_iterations=1,
                                   total_batch_size=dbs * config.model.max_seq_len * world.world_size)
    compute_dtype = resolve_compute_dtype(config.training.dtype, world.device.type)
    tokenizer = prepare_tokenizer(config.data)
    spec = get_train_spec(config.model.name)
    plan = derive_plan(config.model, training, config.optimizer, tokenizer.vocab_size, world.world_size, spec)
    # FSDP casts the sharded blocks' weights and inputs to its param_dtype, which would override the CORE dtype
    # when that differs from the training one; with no param_dtype (no casting) it gathers the fp32 masters and
    # every forward runs in the model's own compute dtype, which CORE switches for its duration.
    param_dtype = compute_dtype
    if "core" in wanted and resolve_core_dtype(config.eval.core_dtype, world.device.type) != compute_dtype:
        param_dtype = None
    model = assemble_model(spec, plan.model_args, config, world, compute_dtype, param_dtype=param_dtype,
                           for_training=False, init=False)
    probe.load(step, {"model": model})
    model.eval()
    logger.info(f"Loaded {probe.step_dir(step)} (depth {config.model.depth}, vocab {tokenizer.vocab_size:,})")
    return model, tokenizer, config, plan, step


def run(args: argparse.Namespace) -> int:
    init_logger()
    world = init_distributed(build_config(None, []).parallelism, resolve_device_type(args.device_type))
    wanted = {part.strip() for part in args.eval.split(",") if part.strip()}
    unknown = wanted - {"bpb", "core", "samples"}
    if unknown:
        raise UserError(f"--eval accepts bpb, core, samples; got {', '.join(sorted(unknown))}")
    model, tokenizer, config, plan, step = _load_model(args.run_dir, args.step, args, world, wanted)

    if "bpb" in wanted:
        token_bytes = tokenizer.token_bytes().to(world.device)
        rows = plan.device_batch_size * plan.seq_len * world.world_size
        steps = max(1, args.split_tokens // rows)
        for split in ("train", "val"):
            loader = build_loader(resolve_data_dir(config.data), split, tokenizer, plan.device_batch_size,
                                  plan.seq_len, rank=world.rank, world_size=world.world_size, device=world.device,
                                  prefetch=0)
            bpb = evaluate_bpb(model, iter(loader), steps, token_bytes)
            loader.close()
            logger.info(f"{split} bpb: {bpb:.6f} ({steps * rows:,} tokens)")

    if "core" in wanted:
        bundle = args.bundle or Path(config.eval.eval_bundle_dir or cache_dir() / "eval_bundle")
        if not (bundle / "core.yaml").is_file():
            raise UserError(f"no CORE bundle at {bundle}: run python -m scripts.download_eval_bundle (internet) or "
                            f"python -m scripts.prepare_core_offline, or pass --bundle")
        # the model was sharded without param_dtype casting when the CORE dtype differs (_load_model)
        settings = core_settings(config.eval, plan.seq_len, world.device.type)
        result = evaluate_core(model, tokenizer, bundle, args.max_per_task, device=world.device, rank=world.rank,
                               world_size=world.world_size, max_seq_len=settings.crop_len, dtype=settings.dtype)
        for task, acc in result.accuracy.items():
            logger.info(f"  {task:<36} accuracy {acc:.4f} | centered {result.centered[task]:+.4f}")
        logger.info(core_line(result, settings.note))
        if world.rank == 0:
            out = args.run_dir / "base_eval" / f"core_step{step:06d}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            write_core_csv(result, out)
            logger.info(f"wrote {out}")

    if "samples" in wanted:
        for text in sample_completions(model, tokenizer):
            logger.info(f"  sample: {text!r}")
        bos = tokenizer.bos_token_id
        for i in range(8):  # unconditional samples from BOS, temperature 1.0 (the reference's base_eval)
            tokens = list(generate(model, [bos], 128, temperature=1.0, seed=42 + i))
            logger.info(f"  unconditional {i}: {tokenizer.decode([t for t in tokens if t != bos])!r}")
    return 0


def main(argv: list[str]) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    cli_entry(main)
