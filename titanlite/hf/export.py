"""A DCP checkpoint -> a Hugging Face folder: config.json, model.safetensors, generation_config.json, the tokenizer
files and, for a custom architecture, its modeling code. `transformers` loads it with no titanlite installed.

The folder is written beside its destination first and moved in file by file once complete; a folder that holds
files this export did not write (no titanlite_export.json listing them) is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from titanlite.config import config_from_toml_text
from titanlite.data.corpora import resolve_tokenizer_dir
from titanlite.data.tokenizer import Tokenizer
from titanlite.errors import UserError
from titanlite.export import check_export_dtype, read_checkpoint_weights
from titanlite.hf.tokenizer import write_hf_tokenizer
from titanlite.spec import TrainSpec

MANIFEST_FILE = "titanlite_export.json"
WEIGHTS_FILE = "model.safetensors"


def find_tokenizer(meta: dict, tokenizer_dir: Path | str | None, step_dir: Path) -> Tokenizer:
    """The tokenizer the checkpoint was trained with: `tokenizer_dir`, else the run config's tokenizer folder;
    its fingerprint must be the one the checkpoint recorded."""
    if tokenizer_dir:
        folder = Path(tokenizer_dir).expanduser()
    elif meta.get("config_toml"):
        folder = resolve_tokenizer_dir(config_from_toml_text(meta["config_toml"]).data)
    else:
        raise UserError(f"{step_dir} does not record its run config, so its tokenizer is unknown; pass "
                        "--tokenizer DIR (the tokenizer folder the run trained with)")
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {folder} (the run's tokenizer folder); pass --tokenizer DIR with the "
                        "tokenizer folder the run trained with (or set TITANLITE_HOME as during training)")
    tokenizer = Tokenizer.load(folder)
    recorded = meta.get("tokenizer_fingerprint")
    if recorded and tokenizer.fingerprint() != recorded:
        raise UserError(f"the tokenizer at {folder} is not the one {step_dir} was trained with (fingerprint "
                        f"{tokenizer.fingerprint()[:12]}, the checkpoint recorded {recorded[:12]}); pass "
                        "--tokenizer DIR with the run's tokenizer folder")
    return tokenizer


def _claim_output(out_dir: Path) -> list[str]:
    """Files a previous export wrote into `out_dir` (to replace); refuse a folder holding anything else."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder; pass --out with a new or empty folder")
    manifest = out_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            return list(json.loads(manifest.read_text())["files"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{manifest} is damaged; remove {out_dir} or pass --out with a new folder") from None
    if any(out_dir.iterdir()):
        raise UserError(f"{out_dir} already holds files titanlite did not export there; pass --out with a new or "
                        "empty folder")
    return []


def export_hf(step_dir: Path, out_dir: Path, dtype: str = "float32", tokenizer_dir: Path | str | None = None
              ) -> Path:
    """DCP step folder -> a Hugging Face folder `out_dir` (see the module docstring)."""
    check_export_dtype(dtype)
    step_dir, out_dir = Path(step_dir), Path(out_dir)
    _claim_output(out_dir)  # refuse a foreign folder before the (slow) read
    spec, meta, weights = read_checkpoint_weights(step_dir)
    tokenizer = find_tokenizer(meta, tokenizer_dir, step_dir)
    return write_hf_folder(out_dir, spec, spec.args_from_dict(meta["model_args"]), weights, tokenizer, dtype,
                           {"step": meta["step"], "source": str(step_dir)})


def write_hf_folder(out_dir: Path, spec: TrainSpec, args, weights: dict[str, torch.Tensor], tokenizer: Tokenizer,
                    dtype: str = "float32", provenance: dict | None = None) -> Path:
    """A family's model (`weights`: full fp32 tensors by titanlite name) and its tokenizer as a Hugging Face folder."""
    torch_dtype = check_export_dtype(dtype)
    out_dir = Path(out_dir)
    previous = _claim_output(out_dir)
    if spec.to_hf is None:
        raise UserError(f"model family {spec.name!r} has no Hugging Face form (its TrainSpec sets no to_hf); "
                        "export it with --format titanlite")
    if tokenizer.vocab_size != args.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {args.vocab_size}; pass "
                        "--tokenizer DIR with the tokenizer folder the run trained with")
    hf = spec.to_hf(args, weights)
    bos = tokenizer.bos_token_id
    # documents are packed as <|bos|> doc <|bos|> doc ...: predicting <|bos|> ends a document
    # and padding reuses it (the vocab has no pad token; pad = eos keeps generate from guessing masks from ids)
    config = {**hf.config, "bos_token_id": bos, "eos_token_id": bos, "pad_token_id": bos, "torch_dtype": dtype}
    generation = {"bos_token_id": bos, "eos_token_id": bos, "pad_token_id": bos}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {name: t.to(torch_dtype).contiguous() for name, t in hf.tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files = [WEIGHTS_FILE, "config.json", "generation_config.json"]
        files += write_hf_tokenizer(tokenizer, tmp, model_max_length=config["max_position_embeddings"])
        for source in hf.code_files:
            shutil.copyfile(source, tmp / Path(source).name)
            files.append(Path(source).name)
        manifest = {"format": "hf", "family": spec.name, **(provenance or {}), "dtype": dtype,
                    "tokenizer_fingerprint": tokenizer.fingerprint(), "files": files + [MANIFEST_FILE]}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        out_dir.mkdir(exist_ok=True)
        for name in previous:  # a previous export's files that this one does not write again (other family)
            if name not in manifest["files"] and (out_dir / name).is_file():
                (out_dir / name).unlink()
        for name in manifest["files"]:  # the manifest last: the folder claims only files already in place
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
