"""Export a DCP checkpoint to one safetensors file + a config JSON, for inference and sharing.

    python -m scripts.export outputs/d12                       # latest step -> outputs/d12/export/
    python -m scripts.export outputs/d12 --step 2000 --dtype bfloat16 --out /tmp/d12-bf16
    python -m scripts.export outputs/d12/step-002000 --out d12

Runs in a plain process (no torchrun): DCP assembles full tensors from every rank's shards. Load the result
with `titanlite.export.load_exported(folder)` (also importable from here). No pickle anywhere: safetensors
for the weights, JSON for the model args.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from titanlite.checkpoint import find_step_dir
from titanlite.export import export_checkpoint, load_exported
from titanlite.cli import run_cli
from titanlite.logging_utils import init_logger, logger

__all__ = ["export_checkpoint", "load_exported", "main"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a run folder (outputs/<model_tag>) or one of its step-NNNNNN folders")
    p.add_argument("--step", default="latest", help="step to export from a run folder (default: latest)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight dtype in the file")
    p.add_argument("--out", default="", help="output folder (default: <run folder>/export)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    init_logger(0)
    args = parse_args(argv)
    step_dir = find_step_dir(Path(args.checkpoint), args.step)
    out = Path(args.out) if args.out else step_dir.parent / "export"
    export_checkpoint(step_dir, out, args.dtype)
    logger.info(f"exported {step_dir} -> {out}/model.safetensors + config.json ({args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
