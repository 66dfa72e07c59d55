"""Reading a DCP checkpoint back tensor by tensor, with no process group and no model: for bit-exact comparisons."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def tensor_digests(step_dir: Path) -> dict[str, str]:
    """{flattened name: sha256 of the bytes} of every tensor in the checkpoint (weights, optimizer state, ...)."""
    metadata = FileSystemReader(str(step_dir)).read_metadata()
    tensors = {name: torch.empty(entry.size, dtype=entry.properties.dtype)
               for name, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}
    with warnings.catch_warnings():  # no process group here on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, checkpoint_id=str(step_dir), no_dist=True)
    return {name: hashlib.sha256(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in tensors.items()}
