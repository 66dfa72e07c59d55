"""Build a trainable (or loadable) model of any registered family: the one assembly path of the trainer,
scripts/base_eval.py, export and the benchmarks.

meta build -> compute dtype + attention kernel -> parallelize (float8, AC, compile, FSDP) -> materialize.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from titanlite.distributed import WorldInfo
from titanlite.kernel_choice import agree_attention_backend
from titanlite.logging_utils import logger
from titanlite.parallelize import materialize
from titanlite.spec import TrainSpec

_UNSET = object()


def assemble_model(spec: TrainSpec, args, config, world: WorldInfo, compute_dtype: torch.dtype, *,
                   param_dtype=_UNSET, for_training: bool = True, init: bool = True,
                   announce_kernel: bool = True) -> nn.Module:
    """The model of `args`, parallelized as `config` asks, its weights initialised on `world.device`.

    for_training=False (evaluation of a checkpoint): no compile, no float8, since neither helps a few forwards.
    param_dtype: FSDP's cast of the sharded weights (default: the compute dtype; None gathers the fp32 masters,
    for an evaluation whose dtype differs from the training one). init=False allocates without drawing weights
    (a checkpoint is loaded over them). announce_kernel=False: no attention-kernel lines (export runs no forward).
    """
    # decided by rank 0 and loaded exactly by every rank (collective when distributed)
    backend, lines = agree_attention_backend(config.model.attention_backend, world.device.type, compute_dtype,
                                             spec.window_pattern(args), distributed=world.is_distributed)
    for line in lines if announce_kernel else ():
        logger.info(line)
    model = spec.build_meta_model(args)
    model.set_compute_dtype(compute_dtype)
    model.set_attention_backend(backend)
    compile_cfg, float8_cfg = config.compile, config.float8
    if not for_training:
        compile_cfg = dataclasses.replace(compile_cfg, enabled="false")
        float8_cfg = dataclasses.replace(float8_cfg, enabled=False)
    model = spec.parallelize(model, world, compile_cfg, float8_cfg, config.activation_checkpoint,
                             param_dtype=compute_dtype if param_dtype is _UNSET else param_dtype)
    if not init:
        model.to_empty(device=world.device)
        model.init_buffers()  # non-persistent: a loaded checkpoint does not bring them
        return model
    return materialize(model, world.device)
