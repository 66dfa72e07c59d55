"""The registry of model families: `model.name` -> TrainSpec. A family is a folder here plus one line below."""

from __future__ import annotations

from titanlite.errors import UserError
from titanlite.models.gpt.spec import GPT_SPEC
from titanlite.models.llama.spec import LLAMA_SPEC
from titanlite.spec import TrainSpec

_REGISTRY: dict[str, TrainSpec] = {spec.name: spec for spec in (GPT_SPEC, LLAMA_SPEC)}


def register_train_spec(spec: TrainSpec, *, replace: bool = False) -> None:
    """Make `spec` selectable by `model.name = spec.name` (a family defined outside titanlite)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a TrainSpec named {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def get_train_spec(name: str) -> TrainSpec:
    if name not in _REGISTRY:
        raise UserError(f"model.name = {name!r} is not a registered model; registered: "
                        f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_specs() -> list[TrainSpec]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
