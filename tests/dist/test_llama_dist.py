"""The llama family under FSDP2 on 2 gloo ranks follows the 1-process loss curve, and its 2-rank checkpoint
resumes in 1 process."""

import pytest
import torch

from tests.helpers.dist import run_in_processes
from tests.helpers.runs import prepared_home

BASE = [
    "--model.name=llama", "--model.depth=2", "--model.aspect_ratio=64", "--model.head_dim=32",
    "--model.max_seq_len=64", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.total_batch_size=256", "--training.num_iterations=6", "--data.vocab_size=512",
    "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1", "--metrics.log_every=1",
    "--metrics.tensorboard=false", "--compile.enabled=false", "--lr_scheduler.warmup_steps=1",
    "--checkpoint.save_every=3",
]


def _run(dump_folder, *extra):
    from titanlite import train
    from titanlite.config import load_config

    trainer = train.Trainer(load_config(BASE + [f"--job.dump_folder={dump_folder}", *extra]))
    try:
        trainer.train()
        sharded = all(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
        return dict(trainer.loss_history), sharded
    finally:
        trainer.close()


def _run_worker(rank, world_size, dump_folder, extra):
    return _run(dump_folder, *extra)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    torch.set_num_threads(1)
    yield from prepared_home(tmp_path_factory, BASE)


def test_two_ranks_follow_one_process_and_resume_in_one(home, tmp_path):
    single, single_sharded = _run(tmp_path / "one", "--training.device_batch_size=4")
    two = run_in_processes(_run_worker, 2, args=(tmp_path / "two", ["--training.device_batch_size=2"]),
                           timeout=300)
    (losses, sharded), (losses_rank1, _) = two
    assert sharded and not single_sharded
    assert losses == losses_rank1  # the logged loss is the global mean, the same on both ranks
    assert sorted(losses) == sorted(single) == list(range(1, 7))
    for step in single:
        assert losses[step] == pytest.approx(single[step], rel=1e-5), step
    resumed, _ = _run(tmp_path / "two", "--training.device_batch_size=4", "--training.num_iterations=6",
                      "--checkpoint.resume_from_step=3")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step
