"""Export a DCP checkpoint for inference and sharing: Hugging Face transformers' format, or titanlite's own.

    python -m scripts.export outputs/d12 --format hf           # latest step -> outputs/d12/export-hf/
    python -m scripts.export outputs/d12                       # titanlite format -> outputs/d12/export/
    python -m scripts.export outputs/d12 --step 2000 --dtype bfloat16 --out /tmp/d12-bf16
    python -m scripts.export outputs/d12/step-002000 --out d12

Runs in a plain process (no torchrun): DCP assembles full tensors from every rank's shards. No pickle anywhere.
`--format hf` writes a folder `transformers` loads without titanlite: a llama run as a standard LlamaForCausalLM,
a gpt run as a custom architecture (AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)), with
the run's tokenizer as tokenizer.json. `--format titanlite` writes model.safetensors + titanlite's config.json, for
`titanlite.export.load_exported(folder)` (also importable from here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from titanlite.checkpoint import find_step_dir
from titanlite.cli import run_cli
from titanlite.export import export_checkpoint, load_exported
from titanlite.hf.export import export_hf
from titanlite.logging_utils import init_logger, logger

__all__ = ["export_checkpoint", "export_hf", "load_exported", "main"]

DEFAULT_OUT = {"titanlite": "export", "hf": "export-hf"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a run folder (outputs/<model_tag>) or one of its step-NNNNNN folders")
    p.add_argument("--format", default="titanlite", choices=("titanlite", "hf"),
                   help="hf: a Hugging Face transformers folder; titanlite: titanlite's own (default)")
    p.add_argument("--step", default="latest", help="step to export from a run folder (default: latest)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight dtype in the file")
    p.add_argument("--out", default="", help="output folder (default: <run folder>/export, or export-hf for hf)")
    p.add_argument("--tokenizer", default="", help="hf: the run's tokenizer folder (default: the one its config "
                                                   "names, under $TITANLITE_HOME)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    init_logger(0)
    args = parse_args(argv)
    step_dir = find_step_dir(Path(args.checkpoint), args.step)
    out = Path(args.out) if args.out else step_dir.parent / DEFAULT_OUT[args.format]
    if args.format == "hf":
        export_hf(step_dir, out, args.dtype, args.tokenizer or None)
        logger.info(f"exported {step_dir} -> {out} (Hugging Face transformers, {args.dtype})")
    else:
        export_checkpoint(step_dir, out, args.dtype)
        logger.info(f"exported {step_dir} -> {out}/model.safetensors + config.json ({args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
