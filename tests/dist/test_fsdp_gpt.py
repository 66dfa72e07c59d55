"""FSDP2 GPT on 2 gloo ranks vs 1 plain process, and DCP checkpoints resharded 2 -> 1 and 1 -> 2.

One module-scoped fixture runs everything (one 2-process spawn; the 2 ranks also check a 2-D HSDP mesh):
  1 process : parallelize_gpt (no mesh) + the project's Muon/AdamW container, 10 steps, checkpoint after step 5
              with both data streams' states in one process
  2 ranks   : parallelize_gpt (FSDP2), same global batch split by rows, 10 steps, checkpoint after step 5 with
              each rank saving only its own stream; then fresh FSDP2 models load the 1-process checkpoint
              (each rank asking for its own stream) and run steps 6..10
  1 process : a fresh model loads the 2-rank checkpoint (asking for both streams) and runs steps 6..10
"""

import hashlib
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from tests.helpers.dist import run_in_processes
from titanlite.checkpoint import CheckpointManager
from titanlite.export import export_checkpoint, load_exported
from titanlite.config.sections import (ActivationCheckpointConfig, CheckpointConfig, CompileConfig, Float8Config,
                                       LRSchedulerConfig, OptimizerConfig, ParallelismConfig)
from titanlite.distributed import init_distributed, set_seed
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.models.gpt.parallelize import parallelize_gpt
from titanlite.parallelize import materialize, set_replica_all_reduce
from titanlite.models.gpt.spec import GPT_SPEC
from titanlite.optim import build_optimizers
from titanlite.spec import LRScales
from titanlite.train_state import TrainState

ARGS = GPTArgs(n_layer=3, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=512, sequence_len=32,
               window_pattern="L", attention_backend="sdpa")
GLOBAL_ROWS, STEPS, SAVE_AT = 4, 10, 5
GLOBAL_TOKENS = GLOBAL_ROWS * ARGS.sequence_len
PLAN = SimpleNamespace(num_iterations=STEPS, groups=GPT_SPEC.optimizer_groups(
    OptimizerConfig(), LRScales(batch=1.0, width=1.0, muon_weight_decay=0.2)))
SCHEDULE = LRSchedulerConfig(warmup_steps=1, warmdown_ratio=0.4, momentum_warmup_steps=4)


def build(world):
    with torch.device("meta"):
        model = GPT(ARGS)
    model = parallelize_gpt(model, world, CompileConfig(enabled="false"), Float8Config(),
                            ActivationCheckpointConfig(mode="selective", selective_every=2))
    set_seed(1234)
    model = materialize(model, world.device)
    wake_zero_projections(model)
    optimizers = build_optimizers(model.optimizer_param_groups(), OptimizerConfig(), PLAN, SCHEDULE,
                                  compute_dtype=torch.float32)
    return model, optimizers


@torch.no_grad()
def wake_zero_projections(model) -> None:
    """Give the zero-initialised output projections small random values (same full tensor on every rank).

    At the recipe's init every block is the identity, so the residual/x0/backout scalars get gradients of ~1e-11:
    pure rounding noise that differs between 1 and 2 processes and that AdamW (eps 1e-10) turns into full-size
    updates. Real gradients make the comparison meaningful.
    """
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            full = torch.randn(p.shape, generator=g) * 0.02
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(full)


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step % 2)  # two batches in turn: learnable, so the loss falls
    tokens = torch.randint(0, ARGS.vocab_size, (GLOBAL_ROWS, ARGS.sequence_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_steps(model, optimizers, world, first: int, last: int) -> list[float]:
    """Steps first..last (1-based); each rank takes its rows; the loss is normalised by the global count."""
    rows = GLOBAL_ROWS // world.world_size
    losses = []
    for step in range(first, last + 1):
        inputs, targets = global_batch(step)
        mine = slice(world.rank * rows, (world.rank + 1) * rows)
        inputs, targets = inputs[mine], targets[mine]
        optimizers.zero_grad()
        loss = model(inputs, targets, loss_reduction="sum") / GLOBAL_TOKENS
        loss.backward()
        optimizers.step(step - 1)
        losses.append(world.all_reduce_sum(loss.detach()).item())
    return losses


def train_steps_accumulated(model, optimizers, world, first: int, last: int) -> list[float]:
    """train_steps with each rank's rows as one-row micro-steps, all-reducing across replicas on the last only
    (as Trainer.train_step does under HSDP)."""
    rows = GLOBAL_ROWS // world.world_size
    losses = []
    for step in range(first, last + 1):
        inputs, targets = global_batch(step)
        optimizers.zero_grad()
        total = torch.zeros(())
        for micro in range(rows):
            set_replica_all_reduce(model, micro == rows - 1)
            row = world.rank * rows + micro
            loss = model(inputs[row:row + 1], targets[row:row + 1], loss_reduction="sum") / GLOBAL_TOKENS
            loss.backward()
            total += loss.detach()
        optimizers.step(step - 1)
        losses.append(world.all_reduce_sum(total).item())
    return losses


def full_params(model) -> dict[str, str]:
    """Exact fingerprints (sha256 of the bytes) of the full parameters: small enough to send between processes."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
    return out


def states(model, optimizers, streams: dict[str, str]):
    return {"model": model, "optimizer": optimizers, "train_state": TrainState(step=SAVE_AT),
            "dataloader": dict(streams)}


def _two_ranks(rank, world_size, single_dir, fsdp_dir):
    world = init_distributed(ParallelismConfig(), "cpu")
    assert world.mesh is not None and world.world_size == 2
    model, optimizers = build(world)
    assert type(model.blocks[0].attn.c_q.weight).__name__ == "DTensor"
    losses = train_steps(model, optimizers, world, 1, SAVE_AT)
    manager = CheckpointManager(CheckpointConfig(), fsdp_dir, world)
    manager.save(SAVE_AT, states(model, optimizers, {f"stream_{rank}": f"state of stream {rank}"}))
    saved_params = full_params(model)
    losses += train_steps(model, optimizers, world, SAVE_AT + 1, STEPS)

    # resume the 1-process checkpoint on 2 ranks, each asking only for its own stream
    model, optimizers = build(world)
    st = states(model, optimizers, {f"stream_{rank}": ""})
    assert CheckpointManager(CheckpointConfig(), single_dir, world).load("latest", st) == SAVE_AT
    loaded_params = full_params(model)
    resumed = train_steps(model, optimizers, world, SAVE_AT + 1, STEPS)

    # HSDP layout: replicate over 2, shard over 1 (a 2-D mesh); same first steps
    hsdp = init_distributed(ParallelismConfig(dp_replicate=2), "cpu")
    model, optimizers = build(hsdp)
    placements = str(model.blocks[0].attn.c_q.weight.placements)
    hsdp_losses = train_steps(model, optimizers, hsdp, 1, 4)
    model, optimizers = build(hsdp)
    hsdp_accumulated = train_steps_accumulated(model, optimizers, hsdp, 1, 4)
    return {"losses": losses, "saved": saved_params, "hsdp": (placements, hsdp_losses), "loaded": loaded_params,
            "hsdp_accumulated": hsdp_accumulated,
            "resumed": resumed,
            "stream": st["dataloader"], "train_step": st["train_state"].step}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, monkeypatch_module):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch_module.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("fsdp_gpt")
        single_dir, fsdp_dir = root / "single", root / "fsdp"
        world = init_distributed(ParallelismConfig(), "cpu")
        assert world.mesh is None
        model, optimizers = build(world)
        losses = train_steps(model, optimizers, world, 1, SAVE_AT)
        CheckpointManager(CheckpointConfig(), single_dir, world).save(
            SAVE_AT, states(model, optimizers, {"stream_0": "state of stream 0", "stream_1": "state of stream 1"}))
        single_saved = full_params(model)
        losses += train_steps(model, optimizers, world, SAVE_AT + 1, STEPS)

        two = run_in_processes(_two_ranks, world_size=2, args=(single_dir, fsdp_dir), timeout=300)

        # resume the 2-rank checkpoint in one process, asking for both streams
        model, optimizers = build(world)
        st = states(model, optimizers, {"stream_0": "", "stream_1": ""})
        CheckpointManager(CheckpointConfig(), fsdp_dir, world).load(SAVE_AT, st)
        loaded = full_params(model)
        resumed = train_steps(model, optimizers, world, SAVE_AT + 1, STEPS)
    finally:
        torch.set_num_threads(threads)
    exported = full_params(load_exported(export_checkpoint(fsdp_dir / "step-000005", root / "export")))
    return SimpleNamespace(exported=exported, losses=losses, single_saved=single_saved, two=two, loaded=loaded,
                           resumed=resumed,
                           streams=st["dataloader"])


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_two_ranks_follow_the_single_process_loss_curve(runs):
    assert len(runs.losses) == STEPS and runs.losses[-1] < runs.losses[0]
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(runs.two[rank]["losses"]), torch.tensor(runs.losses),
                                   rtol=1e-4, atol=0)


def test_hsdp_mesh_follows_the_same_curve(runs):
    placements, losses = runs.two[0]["hsdp"]
    assert placements == "(Replicate(), Shard(dim=0))"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(runs.losses[:4]), rtol=1e-4, atol=0)


def test_hsdp_with_accumulation_all_reducing_once_per_step_follows_the_same_curve(runs):
    """Non-final micro-steps skip the cross-replica all-reduce; the accumulated shards are still all-reduced
    in full on the last one, so the curve is the single process's."""
    losses = runs.two[0]["hsdp_accumulated"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(runs.losses[:4]), rtol=1e-4, atol=0)


def test_checkpoint_from_two_ranks_loads_in_one_process(runs):
    saved = runs.two[0]["saved"]
    assert saved.keys() == runs.loaded.keys()
    for name, tensor in saved.items():
        assert runs.loaded[name] == tensor, name
    assert runs.exported == saved  # the single-file export of the sharded checkpoint holds the same weights
    assert runs.streams == {"stream_0": "state of stream 0", "stream_1": "state of stream 1"}
    torch.testing.assert_close(torch.tensor(runs.resumed), torch.tensor(runs.losses[SAVE_AT:]), rtol=1e-5, atol=0)


def test_checkpoint_from_one_process_loads_on_two_ranks(runs):
    for rank in (0, 1):
        result = runs.two[rank]
        for name, tensor in runs.single_saved.items():
            assert result["loaded"][name] == tensor, name
        assert result["stream"] == {f"stream_{rank}": f"state of stream {rank}"}
        assert result["train_step"] == SAVE_AT
        torch.testing.assert_close(torch.tensor(result["resumed"]), torch.tensor(runs.losses[SAVE_AT:]),
                                   rtol=1e-5, atol=0)



def _bf16_block_dtypes(rank, world_size):
    world = init_distributed(ParallelismConfig(), "cpu")
    with torch.device("meta"):
        model = GPT(ARGS)
    model = parallelize_gpt(model, world, CompileConfig(enabled="false"), Float8Config(),
                            ActivationCheckpointConfig(mode="selective", selective_every=2),
                            param_dtype=torch.bfloat16)
    set_seed(1234)
    model = materialize(model, world.device)
    model.set_compute_dtype(torch.bfloat16)
    seen = {}
    model.blocks[1].attn.register_forward_pre_hook(lambda m, args: seen.update(tables=args[2].dtype))
    model.blocks[1].register_forward_hook(lambda m, args, out: seen.update(block_in=args[0].dtype,
                                                                           block_out=out.dtype))
    inputs, targets = global_batch(0)
    rows = GLOBAL_ROWS // world_size
    model(inputs[rank * rows:(rank + 1) * rows], targets[rank * rows:(rank + 1) * rows]).backward()
    return {k: str(v) for k, v in seen.items()}


def test_fsdp_bf16_blocks_keep_fp32_rope_tables_and_a_bf16_stream(monkeypatch):
    """FSDP's mixed-precision policy casts every floating-point argument of a sharded module to its param dtype;
    the GPT's blocks opt out (casts_own_inputs) so the RoPE tables stay fp32, and cast the residual stream (and
    ve rows) themselves: the stream arrives fp32 from GPT.forward and runs bf16 inside, as it did under FSDP's
    cast, so a sharded block's saved activations are unchanged."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for seen in run_in_processes(_bf16_block_dtypes, world_size=2, timeout=120):
        assert seen == {"tables": "torch.float32", "block_in": "torch.float32", "block_out": "torch.bfloat16"}
