"""Elastic training with real torchrun agents on localhost, real kill -9 and real gloo process groups.

Reference: one uninterrupted `torchrun --standalone --nproc_per_node=2` run of the same tiny config (module fixture).
- a worker killed with kill -9 after the step-4 checkpoint: torchrun restarts the pair (--max-restarts=1), it
  resumes the latest checkpoint on its own and ends with bit-identical final weights and optimizer state;
- two agents (`--nnodes=2`, one process each, c10d rendezvous), FSDP and HSDP across them: the same losses;
- `--nnodes=1:2`, one agent and its worker killed: the other goes on at world size 1 from the latest checkpoint,
  says "world size 2 → 1", and matches a plain 1-process resume from that checkpoint.

Each test takes 20-60 s on 2 contended cores (most of it process start-up and, for the shrink, torchrun's
rendezvous noticing the lost agent).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest

from tests.helpers.checkpoints import tensor_digests
from tests.helpers.runs import prepared_home
from tests.helpers.runs import train_losses
from tests.helpers.torchrun import free_port, kill_tree, launch, read, step_losses, stop, wait_for, worker_pid
from titanlite.checkpoint import list_steps

STEPS = 40  # enough steps after the kill point that the run is still going when the kill lands
ARGS = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=2", "--training.total_batch_size=256", f"--training.num_iterations={STEPS}",
    "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=1", "--metrics.tensorboard=false", "--compile.enabled=false", "--metrics.peak_flops=1e12",
    "--lr_scheduler.warmup_steps=2", "--checkpoint.save_every=4",
]
KILL_AFTER = "step 00004 | checkpoint saved"
TIMEOUT = 150


def _run_dir(dump):
    return dump / "d2"


def _final(dump):
    return _run_dir(dump) / f"step-{STEPS:06d}"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from prepared_home(tmp_path_factory, ARGS)


@pytest.fixture(scope="module")
def reference(home, tmp_path_factory):
    """(printed losses, tensor digests of the final checkpoint) of an uninterrupted standalone 2-process run."""
    dump = tmp_path_factory.mktemp("reference")
    log = dump / "torchrun.log"
    proc = launch(["--standalone", "--nproc_per_node=2"], ARGS + [f"--job.dump_folder={dump}"], log)
    try:
        assert proc.wait(timeout=TIMEOUT) == 0, read(log)[-3000:]
    finally:
        stop([proc])
    losses = step_losses(read(log))
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]  # it trains
    return losses, tensor_digests(_final(dump))


def test_killed_worker_is_restarted_and_ends_bit_identical(reference, tmp_path):
    """kill -9 of rank 0 (the holder of the run-folder lock) after the step-4 checkpoint."""
    log = tmp_path / "torchrun.log"
    proc = launch(["--standalone", "--nproc_per_node=2", "--max-restarts=1"], ARGS + [f"--job.dump_folder={tmp_path}"],
                  log)
    try:
        wait_for(KILL_AFTER, [log], [proc], TIMEOUT)
        os.kill(worker_pid(proc.pid, 0), signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == 0, read(log)[-4000:]
    finally:
        stop([proc])
    out = read(log)
    resumed = re.findall(r"^torchrun restart 1: resuming the latest complete checkpoint, (.*)/step-(\d+)$", out, re.M)
    assert len(resumed) == 1, out[-4000:]
    assert resumed[0][0] == str(_run_dir(tmp_path)) and 4 <= int(resumed[0][1]) < STEPS
    assert "warning: taking over the lock of run folder" in out and "no longer running" in out
    digests = tensor_digests(_final(tmp_path))
    assert len(digests) > 20 and digests == reference[1]  # every weight and optimizer tensor, bit for bit


@pytest.mark.parametrize("replicate", [1, 2], ids=["fsdp", "hsdp"])
def test_two_agents_train_like_one_agent(reference, tmp_path, replicate):
    port = free_port()
    logs = [tmp_path / f"agent{n}.log" for n in range(2)]
    agents = [["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id=two-{port}", f"--rdzv-conf=is_host={str(n == 0).lower()}"] for n in range(2)]
    train = ARGS + [f"--job.dump_folder={tmp_path}", f"--parallelism.dp_replicate={replicate}"]
    procs = [launch(agent, train, log) for agent, log in zip(agents, logs)]
    try:
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=TIMEOUT) == 0, read(log)[-3000:]
    finally:
        stop(procs)
    out = "".join(read(log) for log in logs)
    mesh = "(dp_replicate 2 x dp_shard 1)" if replicate == 2 else "(dp_replicate 1 x dp_shard 2)"
    assert out.count(f"Distributed: world 2 {mesh}") == 1, out[-3000:]  # rank 0 speaks, whichever agent has it
    losses = step_losses(out)
    assert sorted(losses) == sorted(reference[0])
    for step, loss in reference[0].items():
        assert losses[step] == pytest.approx(loss, abs=1e-5), step


def test_losing_an_agent_shrinks_the_world_and_goes_on(reference, home, tmp_path):
    port = free_port()
    logs = [tmp_path / f"agent{n}.log" for n in range(2)]
    # agent 0 hosts the rendezvous store (is_host), agent 1 is the node that gets lost
    agents = [["--nnodes=1:2", "--nproc_per_node=1", "--max-restarts=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=shrink-{port}",
               f"--rdzv-conf=is_host={str(n == 0).lower()},last_call_timeout=5"] for n in range(2)]
    dump = tmp_path / "run"
    procs = [launch(agent, ARGS + [f"--job.dump_folder={dump}"], log) for agent, log in zip(agents, logs)]
    try:
        # kill after a checkpoint saved by the two-agent world (not by agent 0 alone, should agent 1 start late)
        wait_for("Distributed: world 2", logs, procs, TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not any("| checkpoint saved to" in read(log).rpartition("Distributed: world 2")[2] for log in logs):
            assert time.monotonic() < deadline and procs[0].poll() is None, read(logs[0])[-3000:]
            time.sleep(0.01)
        kill_tree(procs[1].pid)
        assert procs[0].wait(timeout=TIMEOUT) == 0, read(logs[0])[-4000:]
    finally:
        stop(procs)
    out = read(logs[0])
    # the last restart is the one after the loss (a heavily loaded machine may start agent 1 late, and torchrun
    # then restarts agent 0's workers once more to let it in: that restart resumes too)
    restarts = list(re.finditer(r"^torchrun restart \d+: ", out, re.M))
    assert restarts, out[-4000:]
    before, after = out[:restarts[-1].start()], out[restarts[-1].start():]
    assert "Distributed: world 2" in "".join(read(log) for log in logs) and after, out[-4000:]
    # the survivor's failed collective is one line, not a traceback from inside FSDP
    lost = r"^error: rank [01] lost another process of this job mid-collective \("
    assert re.search(lost, before, re.M), before[-3000:]
    assert "Traceback" not in before
    lines = re.findall(r"^world size (\d+) → (\d+): resumed from step (\d+) \((.*)\); the global batch stays "
                       r"256 tokens per step, grad accumulation 1 → 2 micro-steps$", after, re.M)
    assert len(lines) == 1, after[-3000:]
    old, new, resumed, step_dir = lines[0]
    resumed = int(resumed)
    assert (old, new) == ("2", "1") and 4 <= resumed < STEPS and step_dir.endswith(f"step-{resumed:06d}")

    # the reference: a plain 1-process resume from a copy of that checkpoint
    alone = tmp_path / "alone"
    shutil.copytree(_run_dir(dump) / f"step-{resumed:06d}", _run_dir(alone) / f"step-{resumed:06d}")
    expected = _printed_losses(ARGS + [f"--job.dump_folder={alone}",
                                                    f"--checkpoint.resume_from_step={resumed}"])
    shrunk = step_losses(after)
    assert sorted(shrunk) == list(range(resumed + 1, STEPS + 1)) == sorted(expected)
    for step in expected:
        assert shrunk[step] == pytest.approx(expected[step], abs=1e-5), step
    assert tensor_digests(_final(dump)) == tensor_digests(_final(alone))  # world 1 either way: bit for bit
    assert list_steps(_run_dir(dump))[-1] == STEPS
    # and the world-2 steps before the loss followed the standalone run (rank 0 was on either agent)
    for step, loss in step_losses(before + read(logs[1])).items():
        assert loss == pytest.approx(reference[0][step], abs=1e-5), step


def _printed_losses(argv) -> dict[int, float]:
    """The printed (smoothed) loss of every step of an in-process run, read from its step lines."""
    from tests.helpers.runs import logged_lines

    with logged_lines() as lines:
        train_losses(argv)
    return step_losses("\n".join(lines))


def _clock_worker(rank, world_size, dump):
    """Rank 1's save clock always says a save is due, rank 0's never: the ranks must still save together.
    The ranks agree about once a second (titanlite.step_control); a zero period makes that every step here."""
    from titanlite import step_control
    from titanlite.save_clock import SaveClock

    SaveClock.due = lambda self: rank == 1
    step_control.CHECK_PERIOD_S = 0.0
    return train_losses(ARGS + [f"--job.dump_folder={dump}", "--training.num_iterations=6",
                                "--checkpoint.save_every=-1", "--checkpoint.save_every_minutes=60"])


def test_one_rank_whose_clock_says_save_makes_every_rank_save(home, tmp_path):
    from tests.helpers.dist import run_in_processes

    losses = run_in_processes(_clock_worker, 2, args=(tmp_path,), timeout=180)
    assert sorted(losses[0]) == list(range(1, 7))
    assert list_steps(_run_dir(tmp_path)) == [1, 2, 3, 4, 5, 6]  # a timed save at every step after step 0
