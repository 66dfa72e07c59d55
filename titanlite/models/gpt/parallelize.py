"""The GPT's FSDP units: its token and value embeddings shard on their own and are not gathered again for
backward (an embedding's backward never reads its table); the head stays gathered from forward to backward (its
output feeds the loss and its backward at once). Everything else is titanlite.parallelize."""

from __future__ import annotations

import torch
import torch.nn as nn

from titanlite.distributed import WorldInfo
from titanlite.parallelize import parallelize


def parallelize_gpt(model: nn.Module, world: WorldInfo, compile_cfg, float8_cfg, ac_cfg,
                    param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32) -> nn.Module:
    return parallelize(model, world, compile_cfg, float8_cfg, ac_cfg, param_dtype, reduce_dtype,
                       fsdp_embedding_units=lambda m: (m.wte, *m.value_embeds.values()),
                       fsdp_gathered_units=lambda m: (m.lm_head,))
