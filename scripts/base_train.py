"""The seed's command line, verbatim, mapped onto titanlite's config and run by the same trainer.

    python -m scripts.base_train --depth=12 --run=mine
    torchrun --nproc_per_node=8 -m scripts.base_train --depth=26 --fp8

Every seed flag maps to one config key (table below, also printed by --help). titanlite's own
`--section.key=value` options, including `--job.config_file`, may be mixed in; a seed flag wins over the TOML.
"""

from __future__ import annotations

from titanlite.errors import UserError

SEED_FLAGS: dict[str, str] = {
    "--run": "metrics.run",
    "--device-type": "training.device_type",
    "--fp8": "float8.enabled",
    "--fp8-recipe": "float8.recipe",
    "--depth": "model.depth",
    "--aspect-ratio": "model.aspect_ratio",
    "--head-dim": "model.head_dim",
    "--max-seq-len": "model.max_seq_len",
    "--window-pattern": "model.window_pattern",
    "--num-iterations": "training.num_iterations",
    "--target-flops": "training.target_flops",
    "--target-param-data-ratio": "training.target_param_data_ratio",
    "--device-batch-size": "training.device_batch_size",
    "--total-batch-size": "training.total_batch_size",
    "--embedding-lr": "optimizer.embedding_lr",
    "--unembedding-lr": "optimizer.unembedding_lr",
    "--matrix-lr": "optimizer.matrix_lr",
    "--scalar-lr": "optimizer.scalar_lr",
    "--weight-decay": "optimizer.weight_decay",
    "--adam-beta1": "optimizer.adam_beta1",
    "--adam-beta2": "optimizer.adam_beta2",
    "--warmup-ratio": "lr_scheduler.warmup_ratio",
    "--warmdown-ratio": "lr_scheduler.warmdown_ratio",
    "--final-lr-frac": "lr_scheduler.final_lr_frac",
    "--resume-from-step": "checkpoint.resume_from_step",
    "--eval-every": "eval.eval_every",
    "--eval-tokens": "eval.eval_tokens",
    "--core-metric-every": "eval.core_metric_every",
    "--core-metric-max-per-task": "eval.core_metric_max_per_task",
    "--sample-every": "eval.sample_every",
    "--save-every": "checkpoint.save_every",
    "--model-tag": "checkpoint.model_tag",
}
BARE_TRUE_FLAGS = {"--fp8"}  # the seed's on/off switch may be given without a value


def translate_seed_args(argv: list[str]) -> list[str]:
    """Turn seed flags into `--section.key=value`; pass titanlite's own dotted options through unchanged."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if flag in SEED_FLAGS:
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if flag in BARE_TRUE_FLAGS and (nxt is None or nxt.startswith("--")):
                    value = "true"
                elif nxt is None or nxt.startswith("--"):
                    raise UserError(f"{flag} needs a value (e.g. {flag}=...); see --help")
                else:
                    value = nxt
                    i += 1
            out.append(f"--{SEED_FLAGS[flag]}={value}")
        elif token.startswith("--") and "." in flag:
            out.append(token)
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append(argv[i + 1])
                i += 1
        elif token == "--":
            pass  # torchrun-style separator, as in the reference's run scripts
        else:
            raise UserError(f"unknown option '{token}' for base_train; seed flags: "
                            f"{', '.join(SEED_FLAGS)} (or titanlite's --section.key=value)")
        i += 1
    return out


def seed_help() -> str:
    rows = "\n".join(f"  {flag:<28} -> {key}" for flag, key in SEED_FLAGS.items())
    return f"usage: python -m scripts.base_train [seed flags] [--section.key=value ...]\n\nseed flags:\n{rows}\n"


def main(argv: list[str]) -> int:
    from titanlite import train

    if any(a in ("-h", "--help") for a in argv):
        print(seed_help())
        return train.main(["--help"])
    return train.main(translate_seed_args(argv))


if __name__ == "__main__":
    from titanlite.train import cli_entry

    cli_entry(main)
