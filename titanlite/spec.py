"""TrainSpec: everything the trainer needs to know about one model family, and the registry of them.

The trainer never imports a model directly: it looks up `model.name` here, builds the model's args from the
plan, constructs the model on the meta device and hands it to the spec's builders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from titanlite.errors import UserError

if TYPE_CHECKING:
    from titanlite.config.sections import ModelConfig
    from titanlite.scaling import Plan

# (plan, model section) -> the model's args dataclass instance
ArgsFromPlan = Callable[["Plan", "ModelConfig"], Any]
# (model, runtime objects such as the device mesh and config sections) -> the same model, parallelized in place
ParallelizeFn = Callable[..., nn.Module]
# (model, plan, config sections, ...) -> optimizer container (Stateful: state_dict / load_state_dict)
BuildOptimizersFn = Callable[..., Any]
# (model, inputs (B,T), targets (B,T)) -> SUM of token losses; the trainer divides by the global token count
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
BuildLossFn = Callable[[], LossFn]


def forward_sum_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Default loss: the model computes it in forward (so the head + CE can be fused/compiled with it)."""
    return model(inputs, targets, loss_reduction="sum")


def build_forward_sum_loss() -> LossFn:
    return forward_sum_loss


@dataclass(frozen=True)
class TrainSpec:
    name: str
    model_args_cls: type
    model_cls: type[nn.Module]
    args_from_plan: ArgsFromPlan
    parallelize: ParallelizeFn | None = None
    build_optimizers: BuildOptimizersFn | None = None
    build_loss: BuildLossFn | None = None

    def loss_fn(self) -> LossFn:
        return (self.build_loss or build_forward_sum_loss)()

    def build_meta_model(self, plan: "Plan", model_cfg: "ModelConfig") -> nn.Module:
        """The model with no storage (meta device); `to_empty(device=...)` + `init_weights()` make it real."""
        args = self.args_from_plan(plan, model_cfg)
        with torch.device("meta"):
            return self.model_cls(args)


_REGISTRY: dict[str, TrainSpec] = {}


def register_train_spec(spec: TrainSpec, *, replace: bool = False) -> None:
    """Make `spec` selectable by `model.name = spec.name`."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a TrainSpec named {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = spec


def _register_builtins() -> None:
    if "gpt" not in _REGISTRY:  # imported lazily so `import titanlite.spec` stays cheap
        from titanlite.models.gpt import gpt_train_spec

        _REGISTRY["gpt"] = gpt_train_spec()


def registered_names() -> list[str]:
    _register_builtins()
    return sorted(_REGISTRY)


def get_train_spec(name: str) -> TrainSpec:
    _register_builtins()
    if name not in _REGISTRY:
        raise UserError(f"model.name = {name!r} is not a registered model; registered: "
                        f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
