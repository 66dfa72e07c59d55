"""Interrupted saves never damage the previous checkpoint nor leave a folder that looks complete.

Two ways a save dies midway: (1) 2 gloo ranks, rank 1's storage write fails after writing part of its file
(DCP then fails the save on every rank); (2) a single process SIGKILLed while writing. The same 2-rank
workers also check an async save (its own gloo group) that training keeps running through. And a preemption:
SIGTERM to one torchrun worker makes both save the step reached and exit 143.
"""

import multiprocessing
import os
import signal

import pytest
import torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from tests.helpers.dist import run_in_processes
from tests.helpers.runs import tiny_run_args
from titanlite.checkpoint import CheckpointManager, list_steps
from titanlite.config.sections import (ActivationCheckpointConfig, CheckpointConfig, CompileConfig, Float8Config,
                                       ParallelismConfig)
from titanlite.distributed import init_distributed, set_seed
from titanlite.models.gpt.model import GPT, GPTArgs
from titanlite.models.gpt.parallelize import parallelize_gpt
from titanlite.parallelize import materialize
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


# ----- SIGTERM under torchrun: every rank takes part in the save, even one that never got the signal -----------

TRAIN_ARGS = tiny_run_args(1000)


def _train_worker(rank, world_size, dump_folder, extra):
    from titanlite import train
    from titanlite.config import load_config

    trainer = train.Trainer(load_config(TRAIN_ARGS + [f"--job.dump_folder={dump_folder}", *extra]))
    try:
        trainer.train()
        return dict(trainer.loss_history)
    finally:
        trainer.close()


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The PID of torchrun's worker with RANK=`rank` (read from the children's environments)."""
    for task in os.listdir(f"/proc/{launcher_pid}/task"):
        with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
            for child in f.read().split():
                try:
                    with open(f"/proc/{child}/environ", "rb") as env:
                        if f"RANK={rank}".encode() in env.read().split(b"\0"):
                            return int(child)
                except OSError:
                    continue
    return None


def test_sigterm_to_one_torchrun_worker_stops_both_with_one_checkpoint(tmp_path, monkeypatch):
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    home = tmp_path / "home"
    monkeypatch.setenv("TITANLITE_HOME", str(home))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    from titanlite.config import load_config
    from titanlite.data.corpora import prepare_corpus, prepare_tokenizer

    prepare_corpus(load_config(TRAIN_ARGS).data)
    prepare_tokenizer(load_config(TRAIN_ARGS).data)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "titanlite.train", *TRAIN_ARGS, f"--job.dump_folder={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    err_lines: list[str] = []
    # one reader per pipe, and nothing else reads them: communicate() would race the stdout reader for lines
    readers = [threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True),
               threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("step 00002/") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.02)
        # only rank 1 is told: rank 0 learns it at the next step boundary and saves with it
        os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
        proc.wait(timeout=300)
        for reader in readers:
            reader.join(timeout=30)
        err = "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = tmp_path / "d2"
    steps = list_steps(run)
    assert len(steps) == 1, err[-3000:]
    reached = steps[0]
    assert sorted(p.name for p in (run / f"step-{reached:06d}").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    stop_lines = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    saved = run / f"step-{reached:06d}"
    assert stop_lines == [f"stopped by SIGTERM after step {reached}: checkpoint saved to {saved}; "
                          "resume with --checkpoint.resume_from_step=latest"]  # rank 0 speaks for both
    assert err.count("exitcode  : 143") == 2, err[-3000:]  # torchrun's summary of both workers

    stop = [f"--debug.stop_after_steps={reached + 2}"]
    straight = run_in_processes(_train_worker, 2, args=(tmp_path / "straight", stop), timeout=300)[0]
    resumed = run_in_processes(_train_worker, 2, args=(tmp_path, stop + ["--checkpoint.resume_from_step=latest"]),
                               timeout=300)[0]
    assert sorted(resumed) == [reached + 1, reached + 2]
    for step in resumed:
        assert resumed[step] == straight[step], step  # bitwise: same 2-process layout


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
