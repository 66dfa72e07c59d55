"""Float8 training of the large linears through torchao, and a switch back to high precision for evaluation.

`apply_float8` swaps `nn.Linear` -> torchao `Float8Linear` on the meta model, before activation checkpointing,
compile and FSDP (the torchtitan order). The swap keeps the same Parameter objects, so the fp32 master weights,
the optimizer groups and the analytic FLOPs count (`GPT.flops_per_token`, which never looks at module classes)
are unchanged. Evaluation (val_bpb, CORE, samples) runs the same weights in the model's compute dtype inside
`bf16_eval(model)`, like the reference recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from titanlite.errors import UserError
from titanlite.logging_utils import logger

FLOAT8_DIM_MULTIPLE = 16  # torch._scaled_mm needs both GEMM dims divisible by 16
MIN_CUDA_CAPABILITY = (8, 9)  # Ada / Hopper and newer have float8 tensor cores


def check_float8_hardware(device: torch.device | str, emulate: bool) -> None:
    """Refuse float8 where the hardware has no float8 matmul, unless emulation was asked for (tests)."""
    device = torch.device(device)
    if emulate:
        return
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        if capability < MIN_CUDA_CAPABILITY:
            name = torch.cuda.get_device_name(index)
            raise UserError(f"float8.enabled = true needs a GPU with compute capability >= 8.9 (H100/H200/L40S/"
                            f"RTX 4090); {name} is {capability[0]}.{capability[1]}: drop --float8.enabled "
                            "(bf16 is used instead)")
        return
    raise UserError(f"float8.enabled = true needs a CUDA GPU with compute capability >= 8.9, not {device.type}; "
                    "drop --float8.enabled, or set --float8.emulate=true to test the float8 path (slow, no speedup)")


def float8_module_filter(exclude_fqns: list[str] | tuple[str, ...]):
    """The torchao `module_filter_fn`: plain Linears with 16-aligned dims and no excluded name part."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        out_features, in_features = module.weight.shape
        if in_features % FLOAT8_DIM_MULTIPLE or out_features % FLOAT8_DIM_MULTIPLE:
            return False
        return not any(name in fqn for name in exclude_fqns)

    return keep


def build_float8_config(recipe: str, emulate: bool):
    from torchao.float8 import Float8LinearConfig

    if recipe not in ("tensorwise", "rowwise"):
        raise UserError(f"float8.recipe = {recipe!r} is not supported; use tensorwise or rowwise")
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    return config


def apply_float8(model: nn.Module, float8_cfg, device: torch.device | str) -> list[str]:
    """Swap eligible Linears for Float8Linear in place (works on meta); returns the converted module names."""
    if not float8_cfg.enabled:
        return []
    check_float8_hardware(device, float8_cfg.emulate)
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    config = build_float8_config(float8_cfg.recipe, float8_cfg.emulate)
    if float8_cfg.recipe == "rowwise":
        # Rowwise scales under inductor need exact casts (pytorch/pytorch#150859); harmless without compile.
        torch._inductor.config.emulate_precision_casts = True
    origins = {name: type(module) for name, module in model.named_modules()}
    convert_to_float8_training(model, config=config, module_filter_fn=float8_module_filter(float8_cfg.exclude_fqns))
    converted = [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
    for name in converted:
        _keep_float8_forward(model.get_submodule(name), origins[name])
    logger.info(f"Float8 ({float8_cfg.recipe}{', emulated' if float8_cfg.emulate else ''}): "
                f"{len(converted)} linear layers converted")
    return converted


def _keep_float8_forward(module: nn.Module, origin: type) -> None:
    """Remember the class a converted module had; if that class has a `float8_forward` (a head whose forward
    also takes targets and fuses the loss, like the GPT's Unembedding), it becomes this module's forward.

    An instance-level forward, like bf16_eval's switch: FSDP's hooks and the module object stay as they are.
    """
    module.float8_origin = origin
    float8_forward = getattr(origin, "float8_forward", None)
    if float8_forward is not None:
        module.forward = types.MethodType(float8_forward, module)


class _Float8RoundTrip(torch.autograd.Function):
    """t -> float8 (torchao's dynamic cast: per-tensor or per-row scale) -> back to `dtype`; the gradient
    passes straight through, as it does through torchao's casts."""

    @staticmethod
    def forward(ctx, t, cast_config, round_scales_to_power_of_2: bool, dtype):
        from torchao.float8.config import ScalingGranularity, ScalingType
        from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

        ctx.input_dtype = t.dtype
        if cast_config.scaling_type is ScalingType.DISABLED:
            return t.to(dtype)
        rowwise = cast_config.scaling_granularity is ScalingGranularity.AXISWISE
        scale = tensor_to_scale(t, cast_config.target_dtype, scaling_granularity=cast_config.scaling_granularity,
                                axiswise_dim=-1 if rowwise else None,
                                round_scales_to_power_of_2=round_scales_to_power_of_2)
        codes = to_fp8_saturated(t.to(torch.float32) * scale, cast_config.target_dtype)
        return (codes.to(torch.float32) / scale).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.input_dtype), None, None, None


def float8_dequantised(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, module.weight) as a torchao Float8Linear's forward matmul sees them, back in x's dtype.

    Both are cast with the module's own config (float8 dtype, per-tensor or per-row scales over the inner
    dimension, power-of-two rounding), so a high-precision matmul of the two is that module's float8 matmul up to
    accumulation order. For code that needs the operands rather than the product (the fused softcap + CE head).
    """
    config = module.config
    round_pow2 = config.round_scales_to_power_of_2
    x_q = _Float8RoundTrip.apply(x, config.cast_config_input, round_pow2, x.dtype)
    weight_q = _Float8RoundTrip.apply(module.weight, config.cast_config_weight, round_pow2, x.dtype)
    return x_q, weight_q


def _high_precision_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Same math as titanlite's model Linear: the master weight cast to the activation dtype.
    weight = self.weight.to(x.dtype)
    bias = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(x, weight, bias)


def float8_modules(model: nn.Module) -> list[nn.Module]:
    # If torchao's float8 module was never imported, nothing can have been converted: don't import it (and
    # its CUDA-kernel loading noise) just to find that out.
    float8_linear = sys.modules.get("torchao.float8.float8_linear")
    if float8_linear is None:
        return []
    return [m for m in model.modules() if isinstance(m, float8_linear.Float8Linear)]


@contextlib.contextmanager
def bf16_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Run Float8Linear layers as plain linears (compute dtype, same weights) inside the block.

    The switch is an instance-level `forward` override, so the module objects (and FSDP's hooks and sharded
    parameters on them) stay exactly as they are; torch.compile guards on it and recompiles once per mode.
    A model without float8 layers passes through untouched.
    """
    swapped = float8_modules(model)
    kept = [module.__dict__.get("forward") for module in swapped]  # a float8_forward installed at conversion
    for module in swapped:
        origin = getattr(module, "float8_origin", None)
        # a head with a fused loss runs its own high-precision forward (it takes targets too)
        forward = origin.forward if getattr(origin, "float8_forward", None) is not None else _high_precision_forward
        module.forward = types.MethodType(forward, module)
    try:
        yield model
    finally:
        for module, forward in zip(swapped, kept):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
