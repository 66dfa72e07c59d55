"""Process group, device mesh, seeding and teardown: who this process is and whom it talks to.

One process per device, started by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) or run
plainly as a single process. Data parallelism only: FSDP2 shards over `dp_shard` ranks and, for HSDP across
nodes, replicates over `dp_replicate` groups, so the mesh is 1-D ("dp_shard",) or 2-D ("dp_replicate",
"dp_shard"). Nothing here assumes a single node: ranks, local ranks and the mesh come from the environment.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titanlite.agent_store import attempt_store
from titanlite.errors import UserError
from titanlite.logging_utils import logger

# Long enough for rank 0 to tokenize a corpus or train a tokenizer while the other ranks wait at a barrier.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)

# Set when init_distributed created the default process group itself; teardown then owns its destruction
# and ends the process with os._exit (torchrun workers). A group created by someone else (tests) is left to them.
_OWNS_PROCESS_GROUP = False


@dataclass
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # None when there is a single process (no FSDP)
    dp_shard: int
    dp_replicate: int

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun, "
                        "launch with torchrun or unset it") from None


def resolve_degrees(world_size: int, dp_shard: int, dp_replicate: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) for `world_size`; dp_shard = -1 takes every rank the replicas leave."""
    if dp_replicate < 1:
        raise UserError(f"parallelism.dp_replicate = {dp_replicate} must be >= 1")
    if dp_shard == -1:
        if world_size % dp_replicate != 0:
            raise UserError(f"parallelism.dp_replicate = {dp_replicate} does not divide the world size "
                            f"{world_size}; choose a divisor of {world_size}")
        dp_shard = world_size // dp_replicate
    elif dp_shard < 1:
        raise UserError(f"parallelism.dp_shard = {dp_shard} must be >= 1, or -1 for all remaining ranks")
    if dp_shard * dp_replicate != world_size:
        raise UserError(f"parallelism.dp_replicate ({dp_replicate}) x parallelism.dp_shard ({dp_shard}) = "
                        f"{dp_shard * dp_replicate} but the world size is {world_size}; make the product equal "
                        "the number of processes (dp_shard = -1 fills it automatically)")
    return dp_replicate, dp_shard


def single_process_world(device: torch.device) -> WorldInfo:
    """One process, no process group, no mesh (export, tools, tests)."""
    return WorldInfo(rank=0, world_size=1, local_rank=0, device=device, mesh=None, dp_shard=1, dp_replicate=1)


def build_mesh(device_type: str, world_size: int, dp_shard: int, dp_replicate: int) -> DeviceMesh:
    # The mesh must live on the training device type: a gloo mesh built as "cuda" on a GPU box moved FSDP
    # params to CUDA and crashed (docs/cpu_notes.md §2).
    if dp_replicate > 1:
        return init_device_mesh(device_type, (dp_replicate, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))


def init_distributed(parallelism_cfg, device_type: str) -> WorldInfo:
    """Join (or create) the default process group from torchrun's environment and build the FSDP mesh.

    A single process without torchrun gets no process group at all and `mesh=None`.
    """
    global _OWNS_PROCESS_GROUP
    from titanlite.device import device_for_rank

    already = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if already else _env_int("WORLD_SIZE", 1)
    rank = dist.get_rank() if already else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if already else 0)
    dp_replicate, dp_shard = resolve_degrees(world_size, parallelism_cfg.dp_shard, parallelism_cfg.dp_replicate)
    device = device_for_rank(device_type, local_rank)

    if world_size == 1 and not already:
        return WorldInfo(rank=0, world_size=1, local_rank=0, device=device, mesh=None, dp_shard=1,
                         dp_replicate=1)
    if not already:
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        # under torchrun the agent's store outlives restarted workers: each attempt gets keys of its own
        store = attempt_store(rank, world_size, PROCESS_GROUP_TIMEOUT)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT, **kwargs)
        _OWNS_PROCESS_GROUP = True
    mesh = build_mesh(device_type, world_size, dp_shard, dp_replicate) if world_size > 1 else None
    logger.info(f"Distributed: world {world_size} (dp_replicate {dp_replicate} x dp_shard {dp_shard}), "
                f"backend {dist.get_backend()}, device {device}")
    return WorldInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh,
                     dp_shard=dp_shard, dp_replicate=dp_replicate)


def set_seed(seed: int) -> None:
    """Same seed on every rank. Together with `materialize` (which always draws full-size weights on the CPU
    generator) every layout starts from bit-identical weights."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks (returns the tensor); a no-op without a process group."""
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def teardown_distributed(exit_code: int = 0) -> None:
    """End the process group in the order that avoids gloo's exit-time SIGABRT (docs/cpu_notes.md §1).

    For a group this module created (torchrun workers) after a successful run: barrier -> destroy -> flush ->
    os._exit(0), so nothing after this call runs. After a failure (exit_code != 0) it returns without touching
    the group: peers may be stuck in a collective (a barrier or destroy could hang), the caller still has an
    error to print, and torchrun stops the other workers once this one exits non-zero. A group created by
    someone else (a test harness) is only destroyed, and the process is left running.
    """
    global _OWNS_PROCESS_GROUP
    if not _initialized():
        return
    if not _OWNS_PROCESS_GROUP:
        dist.destroy_process_group()
        return
    if exit_code != 0:
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        _OWNS_PROCESS_GROUP = False
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
