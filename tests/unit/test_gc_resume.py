"""GC is frozen and disabled after the first step this process runs, also when that step is a resumed one."""

import gc

import pytest
import torch

from titanlite import train
from titanlite.config import load_config

TINY = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=L", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=4", "--training.total_batch_size=256", "--training.num_iterations=6",
    "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=1", "--compile.enabled=false", "--lr_scheduler.warmup_steps=0",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANLITE_HOME", str(tmp_path / "home"))
    torch.set_num_threads(1)
    yield
    gc.unfreeze()
    gc.enable()


def _gc_enabled_before_each_step(config) -> dict[int, bool]:
    trainer = train.Trainer(config)
    seen = {}
    inner = trainer.train_step

    def step(step_index):
        seen[step_index] = gc.isenabled()
        return inner(step_index)

    trainer.train_step = step
    try:
        trainer.train()
    finally:
        trainer.close()
    return seen


def test_gc_is_disabled_after_the_first_resumed_step(tmp_path):
    args = TINY + [f"--job.dump_folder={tmp_path}", "--checkpoint.save_every=3"]
    first = _gc_enabled_before_each_step(load_config(args + ["--debug.stop_after_steps=3"]))
    assert first == {0: True, 1: False, 2: False}
    assert gc.isenabled()  # close() restores it
    resumed = _gc_enabled_before_each_step(load_config(args + ["--checkpoint.resume_from_step=3"]))
    assert resumed == {3: True, 4: False, 5: False}
    assert gc.isenabled() and gc.get_freeze_count() == 0
