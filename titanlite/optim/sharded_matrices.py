"""Move whole matrices of a Shard(0) shape group to the rank that owns them, and the updates back.

FSDP2 leaves every matrix row-sharded across the shard mesh dim (torch.chunk sizes: ceil(rows/W) rows per
rank, the last ranks may hold fewer or none). Muon needs whole matrices, so each shape group of K matrices is
split into contiguous chunks of ceil(K/W) matrices and rank r owns chunk r (as the reference does). One
all_to_all sends every row shard to the owner of its matrix; after the owner computes the updates, a second
all_to_all sends each rank the rows of every matrix it holds. Each direction moves one copy of the group's
data in total, against W copies for an all_gather of every matrix.

HSDP (a 2-D mesh with Replicate on the other dim) works the same inside each shard group: FSDP has already
averaged the gradients across replicas, so the replicas compute identical updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (a view: in-place ops write through), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def owned_range(num_matrices: int, world: int, rank: int) -> range:
    """The contiguous chunk of a group's matrix indices that `rank` orthogonalises."""
    chunk = math.ceil(num_matrices / world)
    return range(min(num_matrices, rank * chunk), min(num_matrices, (rank + 1) * chunk))


def chunk_rows(rows: int, world: int) -> list[int]:
    """Rows held by each rank under Shard(0) (torch.chunk semantics, like DTensor and FSDP2)."""
    chunk = math.ceil(rows / world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


@dataclass
class GroupLayout:
    """How one shape group of K (rows, cols) matrices is spread over the shard process group."""

    num_matrices: int
    rows: int
    cols: int
    process_group: object | None  # None: everything local (plain tensors or a 1-rank shard dim)
    world: int
    rank: int

    @property
    def distributed(self) -> bool:
        return self.process_group is not None

    @property
    def owned(self) -> range:
        return owned_range(self.num_matrices, self.world, self.rank)

    def rows_per_rank(self) -> list[int]:
        return chunk_rows(self.rows, self.world)

    def owned_count(self, rank: int) -> int:
        return len(owned_range(self.num_matrices, self.world, rank))


def describe_group(params: list[torch.Tensor]) -> GroupLayout:
    """Work out the layout of a shape group; every param in it must be placed the same way."""
    rows, cols = params[0].shape
    first = params[0]
    if not isinstance(first, DTensor):
        if any(isinstance(p, DTensor) for p in params):
            raise ValueError("a Muon shape group mixes DTensor and plain parameters")
        return GroupLayout(len(params), rows, cols, None, 1, 0)
    mesh, placements = first.device_mesh, tuple(first.placements)
    for p in params:
        if not isinstance(p, DTensor) or p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError("all parameters of a Muon shape group must share one device mesh and placement")
    shard_dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    if any(not isinstance(pl, (Shard, Replicate)) for pl in placements) or len(shard_dims) > 1 or \
            any(placements[i].dim != 0 for i in shard_dims):
        raise ValueError(f"Muon supports Shard(0) on one mesh dim (FSDP2 / HSDP); got placements {placements}")
    if not shard_dims or mesh.size(shard_dims[0]) == 1:
        return GroupLayout(len(params), rows, cols, None, 1, 0)
    mesh_dim = shard_dims[0]
    layout = GroupLayout(len(params), rows, cols, mesh.get_group(mesh_dim), mesh.size(mesh_dim),
                         mesh.get_local_rank(mesh_dim))
    expected = layout.rows_per_rank()[layout.rank]
    if first.to_local().shape[0] != expected:
        raise ValueError(f"local shard of a ({rows}, {cols}) parameter has {first.to_local().shape[0]} rows, "
                         f"expected {expected} (torch.chunk layout)")
    return layout


class PendingExchange:
    """An in-flight all_to_all; `result()` waits and returns the received data in its final shape."""

    def __init__(self, work, output: torch.Tensor, finish, send: torch.Tensor | None = None):
        self._work, self._output, self._finish = work, output, finish
        self._send = send  # keep the send buffer alive until the exchange completes

    def result(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        return self._finish(self._output)


def gather_owned(layout: GroupLayout, local_shards: list[torch.Tensor]) -> PendingExchange:
    """Start sending every local row shard to the owner of its matrix.

    Result: (n_owned, rows, cols) whole matrices this rank owns (local stack when not distributed).
    """
    if not layout.distributed:
        return PendingExchange(None, torch.stack(local_shards), lambda out: out)
    rows_per_rank, cols = layout.rows_per_rank(), layout.cols
    my_rows, n_owned = rows_per_rank[layout.rank], len(layout.owned)
    # Ownership is contiguous in matrix order, so "for each destination, its matrices" is plain matrix order.
    send = torch.cat([s.reshape(-1) for s in local_shards])
    send_splits = [layout.owned_count(d) * my_rows * cols for d in range(layout.world)]
    recv_splits = [n_owned * r * cols for r in rows_per_rank]
    recv = send.new_empty(sum(recv_splits))
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=layout.process_group, async_op=True)

    def assemble(out: torch.Tensor) -> torch.Tensor:
        pieces = [piece.view(n_owned, r, cols) for piece, r in zip(out.split(recv_splits), rows_per_rank)]
        return torch.cat(pieces, dim=1)

    return PendingExchange(work, recv, assemble, send)


def scatter_updates(layout: GroupLayout, owned_updates: torch.Tensor) -> PendingExchange:
    """Start sending each rank its rows of every updated matrix this rank owns.

    Result: (K, local_rows, cols) update rows for every matrix of the group, in group order.
    """
    if not layout.distributed:
        return PendingExchange(None, owned_updates, lambda out: out)
    rows_per_rank, cols = layout.rows_per_rank(), layout.cols
    my_rows, n_owned = rows_per_rank[layout.rank], len(layout.owned)
    row_blocks = owned_updates.split(rows_per_rank, dim=1)
    send = torch.cat([block.reshape(-1) for block in row_blocks])
    send_splits = [n_owned * r * cols for r in rows_per_rank]
    recv_splits = [layout.owned_count(s) * my_rows * cols for s in range(layout.world)]
    recv = owned_updates.new_empty(sum(recv_splits))
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=layout.process_group, async_op=True)
    return PendingExchange(work, recv, lambda out: out.view(layout.num_matrices, my_rows, cols), send)
