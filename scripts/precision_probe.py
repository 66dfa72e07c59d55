"""How precise each parameter's gradient is in the configured dtype, eager and compiled, against float64.

    python -m scripts.precision_probe --job.config_file train_configs/bench_cpu_d4.toml --training.dtype=bfloat16
    python -m scripts.precision_probe --job.config_file train_configs/bench_cpu_d4.toml \\
        --resume-from outputs/d4/step-000300 --json probe.json

One batch of training data and one set of weights (initialised from the config's seed, or loaded from a
checkpoint) go through four copies of the model in one process: the float64 eager reference, float32 eager, and
the configured compute dtype eagerly and under torch.compile (the whole model, as compile.scope = auto does on
one CPU process; --compile-scope blocks compiles each block alone, as CUDA runs do). Every parameter's gradient of
the mean loss is compared with the reference: relative error = ||g - g_ref|| / ||g_ref||. The float32 column is
the floor a cheaper dtype can hope for; where even it is more than 50 % off, the reference gradient is itself
nearly zero by cancellation (at initialisation the per-layer scalars' gradients vanish exactly in exact
arithmetic) and the table gives the absolute error instead. The mean loss of each copy is printed too: a gap
there that the gradients do not show is a forward-precision effect. Every option that is not a flag below is a
config override (`--section.key=value`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

DTYPE_NAMES = {"torch.float64": "fp64", "torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume-from", type=Path, default=None,
                   help="a checkpoint step folder (RUN_DIR/step-NNNNNN) or run folder (its latest step)")
    p.add_argument("--rows", type=int, default=0, help="batch rows (0: training.device_batch_size)")
    p.add_argument("--compile-scope", choices=("model", "blocks", "none"), default="model",
                   help="what the compiled column compiles (none: skip it)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    return p.parse_known_args(argv)


def _clone_config(config, **sections):
    return dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **values)
                                          for name, values in sections.items()})


def build_models(config, spec, args, world, dtype, compile_scope: str):
    """{label: model} of the four variants, weights not yet set (they are copied from the reference's)."""
    import torch

    from titanlite.assemble import assemble_model

    eager = _clone_config(config, compile={"enabled": "false"}, float8={"enabled": False},
                          activation_checkpoint={"mode": "none"})
    models = {"fp64": assemble_model(spec, args, eager, world, torch.float32, announce_kernel=False),
              "fp32": assemble_model(spec, args, eager, world, torch.float32, announce_kernel=False)}
    models["fp64"].to(torch.float64).set_compute_dtype(torch.float64)
    name = DTYPE_NAMES[str(dtype)]
    if dtype != torch.float32:
        models[f"{name} eager"] = assemble_model(spec, args, eager, world, dtype, announce_kernel=False)
    if compile_scope != "none":
        compiled = _clone_config(eager, compile={"enabled": "true", "scope": compile_scope})
        models[f"{name} compiled"] = assemble_model(spec, args, compiled, world, dtype, announce_kernel=False)
    return models


def load_weights(models: dict, resume_from: Path | None, world) -> str:
    """Initialised weights (the config's seed) or a checkpoint's, the same in every model; returns where from."""
    import torch

    from titanlite.checkpoint import CheckpointManager, find_step_dir
    from titanlite.config import build_config

    source = models["fp32"]
    where = "initialisation"
    if resume_from is not None:
        step_dir = find_step_dir(resume_from)
        manager = CheckpointManager(build_config(None, []).checkpoint, step_dir.parent, world)
        manager.load(int(step_dir.name.split("-")[1]), {"model": source})
        where = str(step_dir)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    with torch.no_grad():
        for model in models.values():
            for key, param in model.state_dict().items():
                param.copy_(state[key].to(param.dtype))
    return where


def gradients(model, inputs, targets) -> tuple[float, dict]:
    """(mean token loss, {parameter name: float64 gradient}) on one batch."""
    import torch

    from titanlite.spec import forward_sum_loss

    model.zero_grad(set_to_none=True)
    loss = forward_sum_loss(model, inputs, targets) / targets.numel()
    loss.backward()
    return float(loss), {name: p.grad.detach().to(torch.float64).clone() for name, p in model.named_parameters()}


def error_table(grads: dict, reference: str = "fp64") -> list[dict]:
    """One row per parameter: ||g_ref|| and, per variant, the absolute error ||g - g_ref|| and the relative one
    (absolute / ||g_ref||; None where g_ref is exactly zero)."""
    ref = grads[reference]
    rows = []
    for name, g_ref in ref.items():
        norm = float(g_ref.norm())
        row = {"parameter": name, "ref_norm": norm, "abs": {}, "rel": {}}
        for label, g in grads.items():
            if label != reference:
                error = float((g[name] - g_ref).norm())
                row["abs"][label] = error
                row["rel"][label] = error / norm if norm > 0 else None
        rows.append(row)
    return rows


def _cell(row: dict, label: str, vanishing: bool) -> str:
    if vanishing:
        return f"abs {row['abs'][label]:.2g}"
    return f"{100 * row['rel'][label]:.2f} %"


def format_table(rows: list[dict], labels: list[str]) -> str:
    """Relative errors; where even float32 is > 50 % off, the reference gradient vanishes by cancellation (its
    norm is rounding noise, e.g. the scalars at initialisation) and the cells give the absolute error instead."""
    head = "| parameter | ||g|| fp64 | " + " | ".join(labels) + " |"
    lines = [head, "|---|---|" + "---|" * len(labels)]
    for row in rows:
        if row["ref_norm"] == 0 and all(v == 0 for v in row["abs"].values()):
            continue  # no gradient at all (e.g. layers behind a zero-initialised projection)
        rel32 = row["rel"].get("fp32")
        vanishing = rel32 is None or rel32 > 0.5
        cells = " | ".join(_cell(row, label, vanishing) for label in labels)
        lines.append(f"| {row['parameter']} | {row['ref_norm']:.3g} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    import torch

    from titanlite.config import load_config
    from titanlite.cpu_peak import cpu_isa
    from titanlite.data.corpora import prepare_corpus, prepare_tokenizer
    from titanlite.data.loader import build_loader
    from titanlite.device import resolve_device_type
    from titanlite.distributed import init_distributed, set_seed
    from titanlite.errors import UserError
    from titanlite.logging_utils import init_logger
    from titanlite.models import get_train_spec
    from titanlite.precision import resolve_compute_dtype
    from titanlite.scaling import derive_plan

    init_logger()
    config = load_config(overrides)
    device_type = resolve_device_type(config.training.device_type)
    world = init_distributed(config.parallelism, device_type)
    if world.world_size != 1:
        raise UserError("scripts.precision_probe runs in one process; start it with python, not torchrun")
    set_seed(config.training.seed)
    dtype = resolve_compute_dtype(config.training.dtype, device_type)
    data_dir, tokenizer = prepare_corpus(config.data), prepare_tokenizer(config.data)
    spec = get_train_spec(config.model.name)
    plan = derive_plan(config.model, config.training, config.optimizer, tokenizer.vocab_size, 1, spec)
    models = build_models(config, spec, plan.model_args, world, dtype, args.compile_scope)
    where = load_weights(models, args.resume_from, world)
    rows = args.rows or plan.device_batch_size
    loader = build_loader(data_dir, "train", tokenizer, rows, plan.seq_len, device=world.device, prefetch=0)
    inputs, targets = next(iter(loader))
    loader.close()
    results = {label: gradients(model, inputs, targets) for label, model in models.items()}
    grads = {label: g for label, (_, g) in results.items()}
    losses = {label: loss for label, (loss, _) in results.items()}
    table = error_table(grads)
    labels = [label for label in grads if label != "fp64"]
    print(f"precision probe: {where}; batch {rows} x {plan.seq_len}; CPU [{cpu_isa()}] "
          f"{torch.get_num_threads()} threads; error = ||g - g_fp64|| / ||g_fp64||")
    print(format_table(table, labels))
    # the forward too: a difference here that the gradients do not show is a forward-precision effect
    print("mean loss: " + " | ".join(f"{label} {loss:.6f} ({loss - losses['fp64']:+.2e})"
                                       for label, loss in losses.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"source": where, "losses": losses, "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    from titanlite.train import cli_entry

    cli_entry(main)
