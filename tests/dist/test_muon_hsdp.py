"""Distributed Muon on 4 gloo processes as HSDP 2 x 2 (replicate x shard): the matrices are spread over both
replicas and both shards, and the step equals one process's Muon on whole tensors.

Shapes with rows that do not divide by the shard degree (5, 3) and a group with fewer matrices than workers.
"""

import torch

from tests.helpers.dist import run_in_processes

SHAPES = [(8, 8)] * 5 + [(5, 12)] * 3 + [(3, 4)] * 1 + [(16, 4)] * 2
STEPS = 3


def _full(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _run(params_of, grads_of_step):
    from titanlite.optim.muon import Muon

    params = params_of()
    muon = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = grads_of_step(step, i, p)
        muon.step()
    return params, muon


def _hsdp_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    placements = (Replicate(), Shard(0))

    def params_of():
        return [torch.nn.Parameter(distribute_tensor(_full(s, i), mesh, placements)) for i, s in enumerate(SHAPES)]

    def grads_of_step(step, i, p):
        return distribute_tensor(_full(p.shape, 1000 * (step + 1) + i), mesh, placements)

    params, muon = _run(params_of, grads_of_step)
    owners = [list(layout.owners) for layout in muon.layouts]
    state = muon.state_dict()  # collective: the NorMuon second moments gathered from their owners
    # plain lists: tensors sent through the result queue would travel as shared memory the exiting worker frees
    return {"params": [p.full_tensor().tolist() for p in params], "orthogonalized": muon.orthogonalized_matrices,
            "owners": owners, "second": {k: v["second_momentum_buffer"].tolist() for k, v in state.items()}}


def test_hsdp_2x2_muon_equals_one_process():
    def params_of():
        return [torch.nn.Parameter(_full(s, i)) for i, s in enumerate(SHAPES)]

    reference, single = _run(params_of, lambda step, i, p: _full(p.shape, 1000 * (step + 1) + i))
    ranks = run_in_processes(_hsdp_worker, world_size=4, timeout=240)
    for result in ranks:
        for got, expected in zip(result["params"], reference):
            torch.testing.assert_close(torch.tensor(got), expected.detach(), rtol=1e-5, atol=1e-6)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(torch.tensor(result["second"][key]), value["second_momentum_buffer"],
                                       rtol=1e-5, atol=1e-7)
    # every worker of both replicas owns some work, each matrix is done once per step, and ranks agree on owners
    assert all(r["owners"] == ranks[0]["owners"] for r in ranks)
    assert {w for group in ranks[0]["owners"] for w in group} == {0, 1, 2, 3}
    assert sum(r["orthogonalized"] for r in ranks) == len(SHAPES) * STEPS
