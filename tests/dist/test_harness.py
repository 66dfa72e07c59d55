import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist import WorkerFailed, run_in_processes


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return (rank, world_size, t.item())


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()
    return rank


def test_two_gloo_processes_all_reduce():
    results = run_in_processes(_all_reduce_rank, world_size=2)
    assert results == [(0, 2, 3.0), (1, 2, 3.0)]


def test_worker_failure_shows_child_traceback():
    with pytest.raises(WorkerFailed, match="boom on rank one"):
        run_in_processes(_fail_on_rank_one, world_size=2, timeout=60)
