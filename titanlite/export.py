"""Export a DCP checkpoint of any registered model family to one safetensors file + a config JSON, and load it.

Runs in a plain process (no process group): DCP reads every rank's shards and assembles full tensors. No
pickle anywhere: safetensors for the weights, JSON for the model args. The family is found from the args class
the checkpoint recorded (older checkpoints: the family whose args have exactly the saved fields).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from titanlite.assemble import assemble_model
from titanlite.checkpoint import META_FILE, WeightsOnlyLoadPlanner, describe_failure, quiet_single_process, read_meta
from titanlite.config import build_config, config_from_toml_text
from titanlite.distributed import single_process_world
from titanlite.errors import UserError
from titanlite.models import registered_specs
from titanlite.spec import TrainSpec

EXPORT_WEIGHTS_FILE = "model.safetensors"
EXPORT_CONFIG_FILE = "config.json"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def spec_for_args(args_class: str | None, model_args: dict) -> TrainSpec:
    for spec in registered_specs():
        if spec.model_args_cls.__name__ == args_class:
            return spec
    if args_class is None:  # saved before the class was recorded
        for spec in registered_specs():
            if {f.name for f in dataclasses.fields(spec.model_args_cls)} == set(model_args):
                return spec
    raise UserError(f"no registered model family has the args {args_class or sorted(model_args)}; register the "
                    f"family that trained this checkpoint (titanlite.models.register_train_spec)")


def check_export_dtype(dtype: str) -> torch.dtype:
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export dtype {dtype!r} is not supported; use float32 or bfloat16")
    return EXPORT_DTYPES[dtype]


def read_checkpoint_weights(step_dir: Path) -> tuple[TrainSpec, dict, dict[str, torch.Tensor]]:
    """(family spec, meta.json, full fp32 model weights by titanlite name) of a DCP step folder."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    if not meta.get("model_args"):
        raise UserError(f"{step_dir}/{META_FILE} has no model_args: this checkpoint cannot be exported")
    spec = spec_for_args(meta.get("model_args_class"), meta["model_args"])
    # the trainer's assembly path, in one plain CPU process: no FSDP, no compile, no float8, no weights drawn
    config = config_from_toml_text(meta["config_toml"]) if meta.get("config_toml") else build_config(None, [])
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_backend="sdpa"))
    model = assemble_model(spec, spec.args_from_dict(meta["model_args"], attention_backend="sdpa"), config,
                           single_process_world(torch.device("cpu")), torch.float32, for_training=False, init=False,
                           announce_kernel=False)
    weights = get_model_state_dict(model)
    try:
        with quiet_single_process():
            dcp.load({"model": weights}, checkpoint_id=str(step_dir), planner=WeightsOnlyLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001
        raise UserError(f"could not read the model weights of {step_dir}: {describe_failure(exc)}") from exc
    return spec, meta, {name: t.detach() for name, t in weights.items()}


def export_checkpoint(step_dir: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """DCP step folder -> `out_dir/model.safetensors` (full, unsharded) + `out_dir/config.json`."""
    torch_dtype = check_export_dtype(dtype)
    spec, meta, weights = read_checkpoint_weights(step_dir)
    tensors = {name: t.to(torch_dtype).contiguous() for name, t in weights.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / EXPORT_WEIGHTS_FILE), metadata={"format": spec.export_format,
                                                                     "step": str(meta["step"])})
    config = {"format": spec.export_format, "model_args": meta["model_args"],
              "model_args_class": spec.model_args_cls.__name__, "step": meta["step"], "dtype": dtype,
              "source": str(step_dir)}
    (out_dir / EXPORT_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


def load_exported(path: Path | str, device: torch.device | str = "cpu", attention_backend: str = "auto"):
    """An exported folder (or its model.safetensors) -> a ready model in eval mode with fp32 master weights."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    config_file, weights_file = folder / EXPORT_CONFIG_FILE, folder / EXPORT_WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"{folder} is not an exported model: it needs {EXPORT_WEIGHTS_FILE} and {EXPORT_CONFIG_FILE} "
                        "(write them with python -m scripts.export)")
    config = json.loads(config_file.read_text())
    spec = spec_for_args(config.get("model_args_class"), config.get("model_args") or {})
    if config.get("format") != spec.export_format:
        raise UserError(f"{config_file} has format {config.get('format')!r}, expected {spec.export_format!r}")
    model = spec.build_meta_model(spec.args_from_dict(config["model_args"], attention_backend=attention_backend))
    model.to_empty(device=device)
    tensors = load_file(str(weights_file), device=str(device))
    model.load_state_dict({name: t.float() for name, t in tensors.items()}, strict=True)
    model.init_buffers()
    return model.eval()
