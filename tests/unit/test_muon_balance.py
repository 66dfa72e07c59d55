"""Distributed Muon's split of the orthogonalisation work at 64 and 1,024 ranks, d20 and d26 GPT shapes.

The real Muon is built over the real FSDP2 parameters of a meta-device GPT on a fake process group (rank 0's
view; owners are the same on every rank). Loads are recomputed here from the matrix shapes each worker owns.
"""

from collections import Counter

import pytest
import torch
from torch.distributed.fsdp import fully_shard

from tests.helpers.fake_world import fake_world
from titanlite.config.sections import ModelConfig
from titanlite.models.gpt.model import GPT
from titanlite.models.gpt.spec import build_args
from titanlite.optim.muon import Muon


def polar_express_flops(rows: int, cols: int) -> int:
    """One Polar Express iteration, m = min(rows, cols), n = max: X X^T (2 m^2 n), b A + c A A (2 m^3), B X
    (2 m^2 n)."""
    m, n = min(rows, cols), max(rows, cols)
    return 2 * m * m * n + 2 * m ** 3 + 2 * m * m * n


def muon_loads(depth: int, world_size: int, dp_replicate: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(FLOPs per worker, the shapes of all matrices) for the GPT at `depth` with FSDP2 on the given mesh."""
    args = build_args(ModelConfig(depth=depth), 32768)
    with fake_world(world_size, dp_replicate=dp_replicate) as world:
        with torch.device("meta"):
            model = GPT(args)
        for block in model.blocks:
            fully_shard(block, mesh=world.mesh)
        muon = Muon(list(model.blocks.parameters()))
        loads = [0] * world_size
        shapes = []
        for layout in muon.layouts:
            assert len(layout.owners) == layout.num_matrices
            for worker in layout.owners:
                loads[worker] += polar_express_flops(layout.rows, layout.cols)
            shapes += [(layout.rows, layout.cols)] * layout.num_matrices
        # every block matrix is in some group, exactly once
        assert sorted(shapes) == sorted(tuple(p.shape) for p in model.blocks.parameters())
    return loads, shapes


def best_possible_max(shapes: list[tuple[int, int]], workers: int) -> float:
    """A lower bound on the busiest worker's load for any split of whole matrices.

    max(mean, the largest matrix) and a granular bound: the GPT's matrices are C x C (6 C^3 per iteration)
    and 4C x C or C x 4C (4 C^2 4C + 2 C^3 = 18 C^3, exactly 3 square ones), so in units of a square matrix every
    load is a whole number plus the tiny ve_gate matrices, and some worker holds at least ceil(units / workers).
    """
    flops = [polar_express_flops(*s) for s in shapes]
    unit = polar_express_flops(*Counter(shapes).most_common(1)[0][0])  # the C x C matrices are the most common
    big = [f for f in flops if f >= unit]
    assert all(f % unit == 0 for f in big)
    granular = -(-sum(big) // unit // workers) * unit
    return max(sum(flops) / workers, max(flops), granular)


@pytest.mark.parametrize("depth", [20, 26])
@pytest.mark.parametrize("world_size,dp_replicate", [(64, 1), (64, 8), (1024, 128)],
                         ids=["fsdp64", "hsdp8x8", "hsdp128x8"])
def test_orthogonalisation_work_is_balanced(depth, world_size, dp_replicate):
    """The busiest worker's load <= 1.25 x the best any split of whole matrices can reach, every replica's
    ranks counted as workers. Against the plain mean: <= 1.25 at d26 on 64 ranks (1.23); d20 on 64 ranks cannot
    get below 1.28 (200 square-matrix units over 64 workers: someone holds 4 = 1.28 x the mean of 3.125); at
    1,024 ranks there are fewer matrices than ranks, so each sits on a worker of its own."""
    loads, shapes = muon_loads(depth, world_size, dp_replicate)
    mean = sum(loads) / len(loads)
    assert max(loads) <= 1.25 * best_possible_max(shapes, world_size)
    if world_size == 64 and depth == 26:
        assert max(loads) / mean <= 1.25
    if world_size == 1024:
        assert len(shapes) < world_size
        assert sum(1 for load in loads if load) == len(shapes)
        assert max(loads) == max(polar_express_flops(*s) for s in shapes)
