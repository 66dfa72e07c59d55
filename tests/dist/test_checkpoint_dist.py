"""Interrupted saves never damage the previous checkpoint nor leave a folder that looks complete.

Two ways a save dies midway: (1) 2 gloo ranks, rank 1's storage write fails after writing part of its file
(DCP then fails the save on every rank); (2) a single process SIGKILLed while writing. The same 2-rank
workers also check an async save (its own gloo group) that training keeps running through.
"""

import multiprocessing
import os
import signal

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from tests.helpers.dist import run_in_processes
from titanlite.checkpoint import CheckpointManager, list_steps
from titanlite.config.sections import (ActivationCheckpointConfig, CheckpointConfig, CompileConfig, Float8Config,
                                       ParallelismConfig)
from titanlite.distributed import init_distributed, set_seed
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.models.gpt.parallelize import materialize, parallelize_gpt
from titanlite.train_state import TrainState

ARGS = GPTArgs(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, vocab_size=512, sequence_len=32,
               window_pattern="L", attention_backend="sdpa")


def build(world, seed: int):
    with torch.device("meta"):
        model = GPT(ARGS)
    model = parallelize_gpt(model, world, CompileConfig(enabled="false"), Float8Config(), ActivationCheckpointConfig())
    set_seed(seed)
    return materialize(model, world.device)


def fingerprint(model) -> list[float]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).double().sum().item() for p in model.parameters()]


def _failing_write_on(rank_to_fail: int, real_write):
    def write_data(self, plan, planner):
        if int(os.environ["RANK"]) == rank_to_fail:
            with open(os.path.join(str(self.path), "__partial_write"), "wb") as f:
                f.write(b"half a shard")
            raise OSError("No space left on device (injected)")
        return real_write(self, plan, planner)

    return write_data


def _interrupted_save(rank, world_size, folder):
    world = init_distributed(ParallelismConfig(), "cpu")
    model = build(world, seed=1)
    good = fingerprint(model)

    # async save (own gloo group), parameters change while it is in flight, published at the next save
    manager = CheckpointManager(CheckpointConfig(async_mode="async"), folder, world)
    manager.save(1, {"model": model, "train_state": TrainState(step=1), "dataloader": {f"stream_{rank}": rank}})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    manager.wait()  # publish step 1 before breaking the writer below (the async write uses it too)

    # step 2 dies while rank 1 writes: every rank sees the failure
    real_write = FileSystemWriter.write_data
    FileSystemWriter.write_data = _failing_write_on(1, real_write)
    try:
        manager.save(2, {"model": model, "train_state": TrainState(step=2), "dataloader": {f"stream_{rank}": rank}},
                     final=True)
        failed = None
    except BaseException as exc:  # noqa: BLE001 - DCP raises CheckpointException (a BaseException)
        failed = type(exc).__name__
    finally:
        FileSystemWriter.write_data = real_write
    torch.distributed.barrier()
    after_failure = {"steps": list_steps(folder), "entries": sorted(p.name for p in folder.iterdir()),
                     "latest": manager.latest_step()}

    fresh = build(world, seed=2)
    state = TrainState()
    streams = {f"stream_{rank}": -1}
    manager.load("latest", {"model": fresh, "train_state": state, "dataloader": streams})
    return {"failed": failed, "after_failure": after_failure, "good": good, "loaded": fingerprint(fresh),
            "step": state.step, "streams": streams}


def test_save_failing_on_one_rank_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "run"
    results = run_in_processes(_interrupted_save, world_size=2, args=(folder,), timeout=240)
    for rank, result in enumerate(results):
        assert result["failed"] is not None, "the failed write must fail the save on every rank"
        assert result["after_failure"]["steps"] == [1]
        assert result["after_failure"]["latest"] == 1
        assert "step-000002" not in result["after_failure"]["entries"]
        assert result["loaded"] == result["good"]  # the async checkpoint holds the weights at save time
        assert result["step"] == 1 and result["streams"] == {f"stream_{rank}": rank}
    assert list_steps(folder) == [1]


def _killed_mid_save(folder):
    from titanlite.distributed import WorldInfo

    world = WorldInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None, dp_shard=1,
                      dp_replicate=1)
    model = build(world, seed=1)
    manager = CheckpointManager(CheckpointConfig(), folder, world)
    manager.save(1, {"model": model, "train_state": TrainState(step=1)})
    real_write = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        real_write(self, plan, planner)  # data files on disk, metadata and rename still to come
        os.kill(os.getpid(), signal.SIGKILL)

    FileSystemWriter.write_data = write_then_die
    manager.save(2, {"model": model, "train_state": TrainState(step=2)})


def test_process_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    folder = tmp_path / "run"
    proc = multiprocessing.get_context("spawn").Process(target=_killed_mid_save, args=(folder,))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    assert (folder / ".step-000002.tmp").is_dir()  # the write had started
    assert not (folder / "step-000002").exists()
    world = init_distributed(ParallelismConfig(), "cpu")
    manager = CheckpointManager(CheckpointConfig(), folder, world)
    assert manager.latest_step() == 1
    model, state = build(world, seed=2), TrainState()
    assert manager.load("latest", {"model": model, "train_state": state}) == 1
    assert fingerprint(model) == fingerprint(build(world, seed=1)) and state.step == 1
    manager.save(2, {"model": model, "train_state": state})  # the next save cleans the leftovers
    assert not (folder / ".step-000002.tmp").exists() and list_steps(folder) == [1, 2]


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
