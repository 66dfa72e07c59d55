"""Move whole matrices of a Shard(0) shape group to the rank that owns them, and the updates back.

FSDP2 leaves every matrix row-sharded across the shard mesh dim (torch.chunk sizes: ceil(rows/S) rows per
rank, the last ranks may hold fewer or none). Muon needs whole matrices, so every matrix has one owner among the
"workers": all ranks of the mesh, replicas included (worker id = rank in the exchange group). Owners are chosen
for all shape groups together (`assign_owners`: largest Polar Express cost first, onto the least-loaded worker),
so no rank takes a matrix of every group while others idle. Per step: one all_to_all inside the shard group sends
every row shard to the owner of its matrix (only matrices owned in this replica: each replica computes its share
and nothing twice); after the owner computes the updates, a second all_to_all inside the shard group sends every
rank of the owner's replica its rows of each update. Each direction moves one copy of the data per replica,
against S copies for an all_gather of every matrix.

HSDP (a 2-D mesh with Replicate on the other dim): FSDP has already all-reduced the gradients across replicas,
so any replica's rows are the full gradient's rows; spreading the matrices over the R replicas divides the
orthogonalisation work per rank by R. The updates then reach the other replicas over the replicate group: every
replica that owns matrices of a group broadcasts its ranks' rows of them to their counterparts (same shard index).
Staging a rank's rows once per receiver instead (an owner sending straight to every rank of every replica, or one
all_to_all over the replicate group) holds R copies of them: +3.3 GiB per rank for d20 on HSDP 128 x 8, measured
with `plan --simulate`.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.tensor import DTensor, Replicate, Shard


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (a view: in-place ops write through), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def chunk_rows(rows: int, world: int) -> list[int]:
    """Rows held by each rank under Shard(0) (torch.chunk semantics, like DTensor and FSDP2)."""
    chunk = math.ceil(rows / world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def polar_express_cost(rows: int, cols: int) -> int:
    """FLOPs of one Polar Express iteration on a (rows, cols) matrix, m = min, n = max: the Gram matrix (2 m^2 n),
    its polynomial (2 m^3) and the product with X (2 m^2 n). The per-matrix work Muon's owners split."""
    m, n = min(rows, cols), max(rows, cols)
    return 4 * m * m * n + 2 * m ** 3


def balanced_owners(shapes: list[tuple[int, int, int]], workers: int) -> list[list[int]]:
    """Owner worker of each matrix, for shape groups [(rows, cols, count)], over `workers` workers.

    Longest-processing-time first: matrices by decreasing cost (ties: group order, then index) each go to the
    least-loaded worker (ties: the lowest id). Deterministic, so every rank computes the same owners.
    """
    items = sorted(((polar_express_cost(r, c), g, i) for g, (r, c, k) in enumerate(shapes) for i in range(k)),
                   key=lambda item: (-item[0], item[1], item[2]))
    owners = [[0] * k for _, _, k in shapes]
    loads = [(0, w) for w in range(workers)]  # a heap of (load, worker)
    for cost, g, i in items:
        load, worker = heapq.heappop(loads)
        owners[g][i] = worker
        heapq.heappush(loads, (load + cost, worker))
    return owners


@dataclass
class GroupLayout:
    """How one shape group of K (rows, cols) matrices is spread over the mesh.

    Workers are the ranks of `exchange_group` (all mesh ranks, every replica); `shard_of[w]` and `replica_of[w]`
    are worker w's coordinates. `process_group` is this rank's shard group (the row shards live there).
    """

    num_matrices: int
    rows: int
    cols: int
    process_group: object | None  # None: everything local (plain tensors, or a single worker)
    world: int                    # shard degree S
    rank: int                     # this rank's index in its shard group
    exchange_group: object | None = None
    shard_of: tuple[int, ...] = (0,)
    replica_of: tuple[int, ...] = (0,)
    worker: int = 0               # this rank's worker id
    owners: tuple[int, ...] = field(default=())
    replica_group: object | None = None  # HSDP: this rank and its counterparts (same shard index) in the replicas
    replica_peers: tuple[int, ...] = ()  # their worker ids, in replica_group's rank order

    @property
    def distributed(self) -> bool:
        return self.exchange_group is not None

    @property
    def workers(self) -> int:
        return len(self.shard_of)

    @property
    def owned(self) -> list[int]:
        """The matrix indices (group order) this rank orthogonalises."""
        return self.owned_by(self.worker)

    def owned_by(self, worker: int) -> list[int]:
        return self._by_worker[worker] if worker < len(self._by_worker) else []

    @functools.cached_property
    def _by_worker(self) -> list[list[int]]:
        """Matrix indices per worker; computed once, after assign_owners (every step reads it)."""
        owners = self.owners or (0,) * self.num_matrices
        by_worker: list[list[int]] = [[] for _ in range(self.workers)]
        for m, w in enumerate(owners):
            by_worker[w].append(m)
        return by_worker

    def rows_per_rank(self) -> list[int]:
        return chunk_rows(self.rows, self.world)

    def owned_count(self, worker: int) -> int:
        return len(self.owned_by(worker))


def _exchange_group(mesh, ranks: list[int]):
    """A process group of exactly the mesh's `ranks`: the default group when they are the whole world (no new
    group, no new sockets), else one new group, made once per mesh."""
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD
    group = getattr(mesh, "_titanlite_muon_exchange_group", None)
    if group is None:
        group = dist.new_group(ranks=ranks)
        mesh._titanlite_muon_exchange_group = group
    return group


def describe_group(params: list[torch.Tensor]) -> GroupLayout:
    """Work out the layout of a shape group (owners are assigned later, for all groups together); every param in
    it must be placed the same way."""
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
    if mesh.size() == 1:
        return GroupLayout(len(params), rows, cols, None, 1, 0)
    # The mesh's rank table is a plain CPU tensor; read its values outside any fake-tensor mode (plan --simulate
    # builds the optimizer under FakeTensorMode, which refuses to read values).
    with unset_fake_temporarily():
        mesh_ranks = mesh.mesh.flatten().tolist()
    coordinates = {}  # global rank -> (shard index, replica index): the replica index numbers the other dims
    all_coords = itertools.product(*(range(size) for size in mesh.mesh.shape))  # row-major: the flatten order
    for global_rank, coords in zip(mesh_ranks, all_coords):
        coords = list(coords)
        shard = int(coords.pop(shard_dims[0])) if shard_dims else 0
        others = [mesh.mesh.shape[d] for d in range(mesh.ndim) if not shard_dims or d != shard_dims[0]]
        replica = 0
        for c, size in zip(coords, others):
            replica = replica * size + int(c)
        coordinates[global_rank] = (shard, replica)
    ranks = sorted(mesh_ranks)  # a process group's ranks are in global rank order: worker id = position here
    shard_of = tuple(coordinates[r][0] for r in ranks)
    replica_of = tuple(coordinates[r][1] for r in ranks)
    shard_group = mesh.get_group(shard_dims[0]) if shard_dims and mesh.size(shard_dims[0]) > 1 else None
    replicated = max(replica_of) > 0
    replica_group, replica_peers = None, ()
    if replicated and mesh.ndim == 2 and shard_dims:  # HSDP: the updates cross replicas in the replicate group
        replica_group = mesh.get_group(1 - shard_dims[0])
        replica_peers = tuple(ranks.index(r) for r in dist.get_process_group_ranks(replica_group))
    layout = GroupLayout(
        len(params), rows, cols, shard_group,
        mesh.size(shard_dims[0]) if shard_dims else 1, mesh.get_local_rank(shard_dims[0]) if shard_dims else 0,
        exchange_group=_exchange_group(mesh, ranks) if replicated else shard_group, shard_of=shard_of,
        replica_of=replica_of, worker=ranks.index(dist.get_rank()), replica_group=replica_group,
        replica_peers=replica_peers)
    expected = layout.rows_per_rank()[layout.rank]
    if first.to_local().shape[0] != expected:
        raise ValueError(f"local shard of a ({rows}, {cols}) parameter has {first.to_local().shape[0]} rows, "
                         f"expected {expected} (torch.chunk layout)")
    return layout


def assign_owners(layouts: list[GroupLayout]) -> None:
    """Set every layout's owners, balancing the Polar Express cost over the workers across all groups that share
    one set of workers (in practice: all of them)."""
    by_workers: dict[tuple, list[GroupLayout]] = {}
    for layout in layouts:
        by_workers.setdefault((layout.shard_of, layout.replica_of), []).append(layout)
    for same in by_workers.values():
        owners = balanced_owners([(g.rows, g.cols, g.num_matrices) for g in same], same[0].workers)
        for layout, group_owners in zip(same, owners):
            layout.owners = tuple(group_owners)
            layout.__dict__.pop("_by_worker", None)


class PendingExchange:
    """An in-flight all_to_all; `result()` waits and returns the received data in its final shape."""

    def __init__(self, work, output: torch.Tensor, finish, send: torch.Tensor | None = None):
        self._work, self._output, self._finish = work, output, finish
        self._send = send  # keep the send buffer alive until the exchange completes

    def result(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        return self._finish(self._output)


def _cat(pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat(pieces) if pieces else like.new_empty(0)


def gather_owned(layout: GroupLayout, local_shards: list[torch.Tensor]) -> PendingExchange:
    """Start sending the local row shards of the matrices owned in this replica to their owners (inside the shard
    group); matrices owned in other replicas are not sent: their owners there have the same rows.

    Result: (n_owned, rows, cols) whole matrices this rank owns (local stack when not distributed).
    """
    if not layout.distributed:
        return PendingExchange(None, torch.stack(local_shards), lambda out: out)
    rows_per_rank, cols = layout.rows_per_rank(), layout.cols
    my_rows, n_owned = rows_per_rank[layout.rank], len(layout.owned)
    if layout.process_group is None:  # a shard group of one (pure replication): the local rows are whole matrices
        owned = [local_shards[m] for m in layout.owned]
        stacked = torch.stack(owned) if owned else local_shards[0].new_empty((0, layout.rows, cols))
        return PendingExchange(None, stacked, lambda out: out)
    replica = layout.replica_of[layout.worker]
    peers = {layout.shard_of[w]: w for w in range(layout.workers) if layout.replica_of[w] == replica}
    per_dest = [layout.owned_by(peers[d]) for d in range(layout.world)]
    send = _cat([local_shards[m].reshape(-1) for matrices in per_dest for m in matrices], local_shards[0])
    send_splits = [len(matrices) * my_rows * cols for matrices in per_dest]
    recv_splits = [n_owned * r * cols for r in rows_per_rank]
    recv = send.new_empty(sum(recv_splits))
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=layout.process_group, async_op=True)

    def assemble(out: torch.Tensor) -> torch.Tensor:
        pieces = [piece.view(n_owned, r, cols) for piece, r in zip(out.split(recv_splits), rows_per_rank)]
        return torch.cat(pieces, dim=1)

    return PendingExchange(work, recv, assemble, send)


def scatter_updates(layout: GroupLayout, owned_updates: torch.Tensor) -> PendingExchange:
    """Start sending every rank of every replica its rows of each updated matrix this rank owns.

    Result: the (local_rows, cols) update rows of every matrix of the group, in group order (views of the
    received buffer, or the local stack when not distributed).
    """
    if not layout.distributed:
        return PendingExchange(None, owned_updates, lambda out: out)
    if layout.replica_group is not None:
        return _scatter_via_replicas(layout, owned_updates)
    rows_per_rank, cols, K = layout.rows_per_rank(), layout.cols, layout.num_matrices
    my_rows, n_owned = rows_per_rank[layout.rank], len(layout.owned)
    row_blocks = [block.reshape(-1) for block in owned_updates.split(rows_per_rank, dim=1)]
    send = _cat([row_blocks[layout.shard_of[w]] for w in range(layout.workers)], owned_updates)
    send_splits = [n_owned * rows_per_rank[layout.shard_of[w]] * cols for w in range(layout.workers)]
    arrival = [m for w in range(layout.workers) for m in layout.owned_by(w)]  # matrices in the order they arrive
    recv_splits = [layout.owned_count(w) * my_rows * cols for w in range(layout.workers)]
    recv = owned_updates.new_empty(sum(recv_splits))
    work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=layout.exchange_group, async_op=True)
    position = {m: i for i, m in enumerate(arrival)}

    def in_group_order(out: torch.Tensor) -> list[torch.Tensor]:
        received = out.view(K, my_rows, cols).unbind(0)
        return [received[position[m]] for m in range(K)]

    return PendingExchange(work, recv, in_group_order, send)


def _peers_in_replica(layout: GroupLayout, replica: int) -> list[int]:
    """Worker id of each shard index (0 .. S-1) in one replica."""
    peers = {layout.shard_of[w]: w for w in range(layout.workers) if layout.replica_of[w] == replica}
    return [peers[d] for d in range(layout.world)]


def _owned_in_replica(layout: GroupLayout, replica: int) -> list[int]:
    """Matrices owned in one replica, in the order a shard-group all_to_all delivers them (by shard index)."""
    return [m for w in _peers_in_replica(layout, replica) for m in layout.owned_by(w)]


def _scatter_via_replicas(layout: GroupLayout, owned_updates: torch.Tensor) -> PendingExchange:
    """HSDP: the owner sends its replica's ranks their rows (shard group); then every rank swaps its rows of its
    replica's matrices with its counterparts in the other replicas (replicate group)."""
    rows_per_rank, cols, K = layout.rows_per_rank(), layout.cols, layout.num_matrices
    my_rows, n_owned = rows_per_rank[layout.rank], len(layout.owned)
    if layout.process_group is None:  # a shard group of one: the owned updates are already this rank's rows
        work, recv, send = None, owned_updates.reshape(-1), None
    else:
        send = _cat([block.reshape(-1) for block in owned_updates.split(rows_per_rank, dim=1)], owned_updates)
        send_splits = [n_owned * r * cols for r in rows_per_rank]
        recv_splits = [layout.owned_count(w) * my_rows * cols
                       for w in _peers_in_replica(layout, layout.replica_of[layout.worker])]
        recv = owned_updates.new_empty(sum(recv_splits))
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=layout.process_group,
                                      async_op=True)

    def across_replicas(in_replica: torch.Tensor) -> list[torch.Tensor]:
        # one broadcast per replica that owns matrices of this group, straight into its slice of `out`: staging
        # this rank's rows once per counterpart (an all_to_all) would hold R copies of them (3.3 GiB per rank for
        # d20 on HSDP 128 x 8, measured with plan --simulate)
        arrivals = [_owned_in_replica(layout, layout.replica_of[w]) for w in layout.replica_peers]
        sizes = [len(matrices) * my_rows * cols for matrices in arrivals]
        out = in_replica.new_empty(sum(sizes))
        me = layout.replica_peers.index(layout.worker)
        for source, piece in enumerate(out.split(sizes)):
            if piece.numel() == 0:
                continue
            if source == me:
                piece.copy_(in_replica)
            dist.broadcast(piece, group=layout.replica_group, group_src=source)
        position = {m: i for i, m in enumerate(m for matrices in arrivals for m in matrices)}
        received = out.view(K, my_rows, cols).unbind(0)
        return [received[position[m]] for m in range(K)]

    return PendingExchange(work, recv, across_replicas, send)
