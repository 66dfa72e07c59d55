"""Distributed Muon + AdamW on FSDP2 (2 gloo ranks) against one plain process, and DCP resharding both ways.

One module-scoped fixture runs everything once (one 2-process spawn, ~10 s):
  single: plain model, 5 steps, DCP save after step 2 (no process group at all)
  2 ranks: FSDP2 model, 5 steps, DCP save after step 2; then a fresh FSDP2 model loads the single-process
           checkpoint and runs steps 2..4
  single: a fresh plain model loads the 2-rank checkpoint and runs steps 2..4
Every route must end on the same parameters (fp32, 1e-5).
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn

from tests.helpers.dist import run_in_processes
from titanlite.config.sections import LRSchedulerConfig, OptimizerConfig
from titanlite.models import get_train_spec
from titanlite.optim import build_optimizers
from titanlite.spec import LRScales

# DCP says so when it runs without a process group, which the single-process routes do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB, DIM, HIDDEN, LAYERS = 64, 32, 64, 3
GLOBAL_BATCH, SEQ, STEPS, SAVE_AFTER = 4, 16, 5, 2
SCHEDULE = LRSchedulerConfig(warmup_steps=1, warmdown_ratio=0.4, final_lr_frac=0.1, momentum_warmup_steps=3)
# Smaller AdamW LRs than the seed's: in the first Adam steps m/sqrt(v) amplifies fp32 reduction-order noise
# (1 vs 2 ranks sum gradients in different orders) from ~1e-7 to ~4e-6 at embedding_lr 0.3, and that noise can
# flip a cautious-weight-decay mask element downstream (a jump of lr*wd*|p| ~ 1e-4). At these LRs the routes
# agree to ~5e-7, far inside the 1e-5 tolerance, with Muon weight decay still on.
OPTIMIZER = OptimizerConfig(embedding_lr=0.05, scalar_lr=0.1)
# The GPT family's optimizer groups at batch and width LR scale 1 and Muon weight decay 0.2.
PLAN = SimpleNamespace(num_iterations=STEPS, groups=get_train_spec("gpt").optimizer_groups(
    OPTIMIZER, LRScales(batch=1.0, width=1.0, muon_weight_decay=0.2)))


def _norm(x):
    return F.rms_norm(x, (x.shape[-1],))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(DIM, DIM, bias=False)
        self.proj = nn.Linear(DIM, DIM, bias=False)
        self.fc = nn.Linear(DIM, HIDDEN, bias=False)  # (64, 32): tall, lr x sqrt(2)
        self.out = nn.Linear(HIDDEN, DIM, bias=False)  # (32, 64): wide
        self.gate = nn.Linear(8, 3, bias=False)  # (3, 8): 2 + 1 rows over 2 ranks (uneven shards)

    def forward(self, x, ve):
        x = x + self.proj(torch.tanh(self.attn(_norm(x))))
        x = x + torch.sigmoid(self.gate(x[..., :8])).mean(-1, keepdim=True) * ve
        return x + self.out(F.relu(self.fc(_norm(x))).square())


class StandInGPT(nn.Module):
    """Blocks of Linear layers + embeddings + scalars: every optimizer group of the real model."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.value_embed = nn.Embedding(VOCAB, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(LAYERS))
        self.x0_lambdas = nn.Parameter(torch.full((LAYERS,), 0.1))
        self.smear_gate = nn.Linear(8, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, idx, targets):
        x0 = _norm(self.wte(idx))
        previous = F.pad(x0[:, :-1], (0, 0, 1, 0))
        x0 = x0 + self.smear_lambda * torch.sigmoid(self.smear_gate(x0[..., :8])) * previous
        ve, x = self.value_embed(idx), x0
        for i, block in enumerate(self.blocks):
            x = block(self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0, ve)
        logits = self.lm_head(_norm(x)).float()
        # Sum over this rank's tokens / global token count: gradients add up to the single-process ones.
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum") / (GLOBAL_BATCH * SEQ)

    def optimizer_param_groups(self):
        return {"lm_head": [self.lm_head.weight], "wte": [self.wte.weight], "value_embeds": [self.value_embed.weight],
                "resid_lambdas": [self.resid_lambdas], "x0_lambdas": [self.x0_lambdas],
                "smear": [self.smear_gate.weight, self.smear_lambda],
                "matrices": [p for p in self.blocks.parameters()]}


def _build(seed, world_size=1, mesh_shape=None):
    """Plain model (world_size 1), FSDP2 on a 1-D mesh, or HSDP on a 2-D (replicate, shard) mesh_shape."""
    torch.manual_seed(seed)
    model = StandInGPT()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        names = ("replicate", "shard") if mesh_shape else ("shard",)
        mesh = init_device_mesh("cpu", mesh_shape or (world_size,), mesh_dim_names=names)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for module in model.modules():
            if hasattr(module, "set_gradient_divide_factor"):
                # Sum, not mean: the loss is already globally normalised. Gloo has no PREMUL_SUM, so FSDP
                # must also be told to use plain SUM (with factor 1 nothing is divided afterwards).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    optimizers = build_optimizers(model.optimizer_param_groups(), OPTIMIZER, PLAN, SCHEDULE)
    return model, optimizers


def _train(model, optimizers, steps, rank=0, world_size=1, save_dir=None):
    rows = GLOBAL_BATCH // world_size
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)[rank * rows:(rank + 1) * rows]
        model(data[:, :-1], data[:, 1:]).backward()
        optimizers.step(step)
        optimizers.zero_grad()
        if save_dir is not None and step == SAVE_AFTER - 1:
            dcp.save({"model": model.state_dict(), "optim": optimizers.state_dict()}, checkpoint_id=save_dir)


def _load(model, optimizers, load_dir):
    state = {"model": model.state_dict(), "optim": optimizers.state_dict()}
    dcp.load(state, checkpoint_id=load_dir)
    model.load_state_dict(state["model"])
    optimizers.load_state_dict(state["optim"])


def _full_params(model):
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().numpy().copy()
    return out


def _max_diffs(params, reference):
    """{name: max |param - reference|}: small enough to send back through the result queue."""
    assert params.keys() == reference.keys()
    return {name: float(abs(params[name] - reference[name]).max()) for name in reference}


def _two_rank_worker(rank, world_size, save_dir, single_dir, reference):
    torch.set_num_threads(1)
    model, optimizers = _build(seed=0, world_size=world_size)
    _train(model, optimizers, range(STEPS), rank, world_size, save_dir=save_dir)
    from_scratch = _max_diffs(_full_params(model), reference)
    counts = optimizers.muon.orthogonalized_matrices
    muon = optimizers.muon
    owned = [{"shape": (layout.rows, layout.cols), "matrices": layout.num_matrices,
              "owned": list(layout.owned), "rows_per_rank": layout.rows_per_rank(),
              # measured: the rows FSDP2 really left on this rank, for every matrix of the group
              "local_rows": [p.to_local().shape[0] for p in group["params"]]}
             for layout, group in zip(muon.layouts, muon.param_groups)]

    model, optimizers = _build(seed=1, world_size=world_size)  # different init: the load must overwrite it
    _load(model, optimizers, single_dir)
    _train(model, optimizers, range(SAVE_AFTER, STEPS), rank, world_size)
    resumed = _max_diffs(_full_params(model), reference)

    hsdp = {}
    for mesh_shape in ((1, 2), (2, 1)):  # HSDP: shard group of 2 / pure replication (shard group of 1)
        model, optimizers = _build(seed=0, world_size=world_size, mesh_shape=mesh_shape)
        _train(model, optimizers, range(STEPS), rank, world_size)
        hsdp[mesh_shape] = (_max_diffs(_full_params(model), reference), optimizers.muon.orthogonalized_matrices)
    return {"from_scratch": from_scratch, "resumed_from_single": resumed, "counts": counts, "owned": owned,
            "hsdp": hsdp}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single_dir = str(tmp_path_factory.mktemp("ckpt_single"))
    dist_dir = str(tmp_path_factory.mktemp("ckpt_two_ranks"))
    model, optimizers = _build(seed=0)
    _train(model, optimizers, range(STEPS), save_dir=single_dir)
    reference = _full_params(model)
    single_counts = optimizers.muon.orthogonalized_matrices

    ranks = run_in_processes(_two_rank_worker, world_size=2, args=(dist_dir, single_dir, reference), timeout=240)

    model, optimizers = _build(seed=1)
    _load(model, optimizers, dist_dir)
    _train(model, optimizers, range(SAVE_AFTER, STEPS))
    return SimpleNamespace(reference=reference, single_counts=single_counts, ranks=ranks,
                           resumed_from_two=_full_params(model))


def _assert_close(max_diffs):
    worst = max(max_diffs, key=max_diffs.get)
    assert max_diffs[worst] < 1e-5, f"{worst} differs by {max_diffs[worst]:.3g}"


def test_parameters_moved_so_the_comparison_means_something(runs):
    init = _full_params(_build(seed=0)[0])
    for name in ("blocks.0.fc.weight", "blocks.2.gate.weight", "wte.weight", "x0_lambdas", "smear_lambda"):
        assert abs(runs.reference[name] - init[name]).max() > 1e-3, name


def test_two_ranks_fsdp_match_one_process(runs):
    for result in runs.ranks:
        _assert_close(result["from_scratch"])


def _block_shape_groups():
    """{(rows, cols): number of matrices} of the block parameters, read off a plain model's modules."""
    groups = {}
    for p in StandInGPT().blocks.parameters():
        groups[tuple(p.shape)] = groups.get(tuple(p.shape), 0) + 1
    return dict(sorted(groups.items()))


def _polar_express_flops(rows, cols):
    """Matmul FLOPs of one Polar Express iteration, written out: with m = min(rows, cols), n = max, the Gram
    matrix X X^T is (m x n)(n x m): 2 m^2 n; its polynomial b A + c A^2 costs the (m x m)(m x m) product, 2 m^3;
    the update (a I + B) X is (m x m)(m x n): 2 m^2 n."""
    m, n = min(rows, cols), max(rows, cols)
    return 2 * m * m * n + 2 * m ** 3 + 2 * m * m * n


def test_each_rank_orthogonalises_only_its_share(runs):
    # The stand-in's blocks: attn/proj (32, 32), fc (64, 32), out (32, 64), gate (3, 8), three of each per block.
    groups = _block_shape_groups()
    assert groups == {(3, 8): 3, (32, 32): 6, (32, 64): 3, (64, 32): 3}
    shapes = list(groups)
    owned = [[g["owned"] for g in r["owned"]] for r in runs.ranks]
    # every matrix of every group has exactly one owner
    for i, (shape, k) in enumerate(groups.items()):
        assert sorted(owned[0][i] + owned[1][i]) == list(range(k)), shape
    # FSDP2 Shard(0) (torch.chunk): ceil(rows / 2) rows on rank 0, the rest on rank 1 - e.g. (3, 8): 2 + 1
    for rank, result in enumerate(runs.ranks):
        for (rows, _), layout in zip(shapes, result["owned"]):
            expected = [-(-rows // 2), rows - -(-rows // 2)]
            assert layout["rows_per_rank"] == expected
            assert layout["local_rows"] == [expected[rank]] * groups[(rows, _)]
    # balanced by Polar Express FLOPs across the groups: by hand, the 6 rectangular (4 m^2 n + 2 m^3 = 327,680)
    # and 6 square (6 m^3 = 196,608) matrices split 3 + 3 each way, the 3 gates (342) 2 + 1
    loads = [sum(_polar_express_flops(*shape) * len(group) for shape, group in zip(shapes, mine)) for mine in owned]
    assert sorted(loads) == [3 * 327_680 + 3 * 196_608 + 342, 3 * 327_680 + 3 * 196_608 + 2 * 342]
    owned_per_rank = [sum(len(group) for group in mine) for mine in owned]
    assert sorted(owned_per_rank) == [7, 8]
    assert [r["counts"] for r in runs.ranks] == [n * STEPS for n in owned_per_rank]
    assert sum(r["counts"] for r in runs.ranks) == runs.single_counts == 15 * STEPS


def test_hsdp_meshes_match_one_process(runs):
    for result in runs.ranks:
        for mesh_shape, (max_diffs, _) in result["hsdp"].items():
            _assert_close(max_diffs)
    # Shard dim of 2: the work is split as on a 1-D mesh; shard dim of 1 (two replicas): the replicas split it
    # the same way instead of each doing all 15 matrices
    one_d = [r["counts"] for r in runs.ranks]
    assert [r["hsdp"][(1, 2)][1] for r in runs.ranks] == one_d
    assert [r["hsdp"][(2, 1)][1] for r in runs.ranks] == one_d
    assert sum(one_d) == 15 * STEPS


def test_checkpoint_from_one_process_resumes_on_two(runs):
    for result in runs.ranks:
        _assert_close(result["resumed_from_single"])


def test_checkpoint_from_two_ranks_resumes_on_one_process(runs):
    _assert_close(_max_diffs(runs.resumed_from_two, runs.reference))


def test_schedule_varies_within_the_run():
    s = _build(seed=0)[1].schedule
    assert s.lr_multiplier(0) == 1.0 and s.lr_multiplier(4) == pytest.approx(0.1 + 0.9 / 2)
    assert s.muon_momentum(1) == pytest.approx(0.89) and not math.isclose(s.muon_weight_decay_factor(3), 1.0)
