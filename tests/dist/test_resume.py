"""Exact resume through DCP checkpoints: same process count (bitwise) and 2 -> 1 processes (1e-5)."""

import pytest
import torch

from tests.helpers.dist import run_in_processes

BASE = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=2", "--training.total_batch_size=256", "--training.num_iterations=20",
    "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=1", "--metrics.tensorboard=false", "--compile.enabled=false",
    "--lr_scheduler.warmup_steps=2", "--optimizer.matrix_lr=0.2", "--optimizer.embedding_lr=1.0",
]


def _run(dump_folder, *extra):
    from titanlite import train
    from titanlite.config import load_config

    trainer = train.Trainer(load_config(BASE + [f"--job.dump_folder={dump_folder}", *extra]))
    try:
        trainer.train()
        return dict(trainer.loss_history)
    finally:
        trainer.close()


def _run_worker(rank, world_size, dump_folder, extra):
    return _run(dump_folder, *extra)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One corpus + tokenizer for every run (prepared here, so spawned ranks only read it)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TITANLITE_HOME", str(tmp_path_factory.mktemp("home")))
    from titanlite.config import load_config
    from titanlite.data.corpora import prepare_corpus, prepare_tokenizer

    config = load_config(BASE)
    prepare_corpus(config.data)
    prepare_tokenizer(config.data)
    torch.set_num_threads(1)
    yield
    mp.undo()


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
