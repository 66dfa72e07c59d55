"""Exact resume through DCP checkpoints: same process count (bitwise), 2 -> 1 processes (1e-5), another
device_batch_size / process count on the same global batch (1e-5), and a changed global batch refused by name."""

import shutil

import pytest
import torch

from tests.helpers.dist import run_in_processes
from tests.helpers.runs import prepared_home, train_losses

BASE = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=2", "--training.total_batch_size=256", "--training.num_iterations=20",
    "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=1", "--metrics.tensorboard=false", "--compile.enabled=false",
    "--lr_scheduler.warmup_steps=2", "--optimizer.matrix_lr=0.2", "--optimizer.embedding_lr=1.0",
]


def _run(dump_folder, *extra):
    return train_losses(BASE + [f"--job.dump_folder={dump_folder}", *extra])


def _run_worker(rank, world_size, dump_folder, extra):
    return _run(dump_folder, *extra)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One corpus + tokenizer for every run (prepared here, so spawned ranks only read it)."""
    torch.set_num_threads(1)
    yield from prepared_home(tmp_path_factory, BASE)


def test_resume_on_same_process_count_is_bitwise_exact(home, tmp_path):
    straight = _run(tmp_path / "straight")
    _run(tmp_path / "resumed", "--checkpoint.save_every=10", "--debug.stop_after_steps=10")
    resumed = _run(tmp_path / "resumed", "--checkpoint.resume_from_step=10")
    assert sorted(resumed) == list(range(11, 21))
    assert straight[20] < straight[1]  # it trains
    for step in range(11, 21):
        assert resumed[step] == straight[step], step  # bitwise on CPU


def test_save_on_two_processes_resume_on_one(home, tmp_path):
    straight = run_in_processes(_run_worker, 2, args=(tmp_path / "two", []), timeout=300)[0]
    run_in_processes(_run_worker, 2, args=(tmp_path / "split", ["--checkpoint.save_every=10",
                                                                "--debug.stop_after_steps=10"]), timeout=300)
    resumed = _run(tmp_path / "split", "--checkpoint.resume_from_step=latest")
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step
    # and the 2-process run itself follows the 1-process run on the same global batch
    single = _run(tmp_path / "one")
    for step in range(1, 21):
        assert single[step] == pytest.approx(straight[step], rel=1e-4), step


# 8 rows of 64 tokens per step: 1 x 8, 1 x 4 x 2 micro-steps and 2 x 4 all split the same global batch
EIGHT_ROWS = ["--training.total_batch_size=512"]


def test_resume_with_another_device_batch_and_process_count(home, tmp_path):
    straight = _run(tmp_path / "straight", *EIGHT_ROWS, "--training.device_batch_size=8")
    _run(tmp_path / "saved", *EIGHT_ROWS, "--training.device_batch_size=8", "--checkpoint.save_every=10",
         "--debug.stop_after_steps=10")
    step_dir = tmp_path / "saved" / "d2" / "step-000010"
    resumed = {}
    for name, world in (("b4", 1), ("2x4", 2)):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "saved", folder)  # each resume gets its own copy of the step-10 checkpoint
        extra = [*EIGHT_ROWS, "--training.device_batch_size=4", "--checkpoint.resume_from_step=10"]
        if world == 1:
            resumed[name] = _run(folder, *extra)
        else:
            resumed[name] = run_in_processes(_run_worker, 2, args=(folder, extra), timeout=300)[0]
    assert step_dir.is_dir() and straight[20] < straight[1]
    for name, losses in resumed.items():
        assert sorted(losses) == list(range(11, 21)), name
        for step in range(11, 21):
            assert losses[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), (name, step)


@pytest.mark.parametrize("change, named", [
    (["--training.total_batch_size=256", "--training.device_batch_size=4"], "--training.total_batch_size=512"),
    (["--model.max_seq_len=32", "--training.total_batch_size=256"], "--model.max_seq_len=64"),
])
def test_resume_with_another_global_batch_is_refused_by_name(home, tmp_path, change, named):
    from titanlite.errors import UserError

    _run(tmp_path, *EIGHT_ROWS, "--training.device_batch_size=8", "--checkpoint.save_every=2",
         "--debug.stop_after_steps=2")
    with pytest.raises(UserError) as info:
        _run(tmp_path, *EIGHT_ROWS, *change, "--checkpoint.resume_from_step=latest")
    line = str(info.value)
    assert named in line and "\n" not in line and "corrupt" not in line


def test_checkpoint_from_before_streams_per_row_resumes_with_fresh_data(home, tmp_path):
    """Its model and optimizer load; its data state (one stream per micro-batch) cannot continue: one warning."""
    import json
    import logging

    from titanlite import train
    from titanlite.config import load_config
    from titanlite.logging_utils import logger

    trainer = train.Trainer(load_config(BASE + [f"--job.dump_folder={tmp_path}", "--checkpoint.save_every=2",
                                                "--debug.stop_after_steps=2"]))
    states = trainer._checkpoint_states

    def old_layout():  # what titanlite wrote before: one "stream_<j>" entry per (rank, micro-step)
        return dict(states(), dataloader={"stream_0": json.dumps({"version": 1}), "stream_1": "{}"})

    trainer._checkpoint_states = old_layout
    try:
        trainer.train()
    finally:
        trainer.close()
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    try:
        resumed = _run(tmp_path, "--checkpoint.resume_from_step=2")
    finally:
        logger.removeHandler(handler)
    assert sorted(resumed) == list(range(3, 21))
    assert [line for line in lines if "older titanlite" in line] == [
        f"warning: checkpoint {tmp_path / 'd2' / 'step-000002'} holds data loader state from an older titanlite "
        "(streams per micro-batch, which this one cannot continue): the model and optimizer resume, the data "
        "starts again from the beginning of the corpus"]
