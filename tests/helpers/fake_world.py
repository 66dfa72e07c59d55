"""Many ranks in one process: torch's `fake` process group (every collective returns at once, leaving its output
buffers as they were) and a recorder of the collectives a piece of code issues, by process group.

Real tensors on a fake group: FSDP2, DTensor and the optimizers run their real code paths at any world size; only
the numbers that would have come from other ranks are garbage, so these tests count and compare structure
(FSDP units, collectives, ownership), never values.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from titanlite.distributed import WorldInfo


@contextlib.contextmanager
def fake_world(world_size: int, dp_replicate: int = 1, rank: int = 0) -> Iterator[WorldInfo]:
    """A WorldInfo of `world_size` ranks on a fake process group (this process is `rank`), torn down after."""
    if dist.is_initialized():
        raise RuntimeError("a process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        dp_shard = world_size // dp_replicate
        if dp_replicate > 1:
            mesh = init_device_mesh("cpu", (dp_replicate, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
        yield WorldInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"), mesh=mesh,
                        dp_shard=dp_shard, dp_replicate=dp_replicate)
    finally:
        dist.destroy_process_group()


def _group_name(arg) -> str | None:
    if isinstance(arg, dist.ProcessGroup):
        return arg.group_name
    if isinstance(arg, torch.ScriptObject):
        try:
            return dist.ProcessGroup.unbox(arg).group_name
        except Exception:  # noqa: BLE001 - a script object that is not a process group (e.g. a ReduceOp)
            return None
    return None


class CollectiveRecorder(TorchDispatchMode):
    """Records (collective, process group name) for every c10d op dispatched while active, in order."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            group = next((g for g in map(_group_name, args) if g is not None), None)
            self.calls.append((func._opname, group))
        return func(*args, **(kwargs or {}))

    def count(self, op: str | None = None, group: str | None = None) -> int:
        return sum(1 for name, g in self.calls if (op is None or name == op) and (group is None or g == group))

    def by_group(self) -> Counter:
        return Counter(g for _, g in self.calls)
