"""Both model families through the same Trainer: val_bpb, samples, checkpoint, bitwise resume, export, dry run."""

import math

import pytest
import torch

from titanlite import train
from titanlite.config import load_config
from titanlite.export import export_checkpoint, load_exported
from titanlite.models.llama.model import Llama

TINY = [
    "--model.depth=2", "--model.aspect_ratio=64", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=L", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=4", "--training.total_batch_size=256", "--training.num_iterations=8",
    "--data.vocab_size=512", "--eval.eval_every=4", "--eval.eval_tokens=512", "--eval.sample_every=8",
    "--eval.core_metric_every=-1", "--metrics.log_every=1", "--metrics.tensorboard=false",
    "--compile.enabled=false", "--lr_scheduler.warmup_steps=1", "--checkpoint.save_every=4",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TITANLITE_HOME", str(tmp_path_factory.mktemp("home")))
    torch.set_num_threads(1)
    yield
    mp.undo()


def _train(dump, *extra):
    trainer = train.Trainer(load_config(TINY + [f"--job.dump_folder={dump}", *extra]))
    try:
        summary = trainer.train()
        return trainer, summary, dict(trainer.loss_history)
    finally:
        trainer.close()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_family_trains_through_the_trainer(home, tmp_path, family):
    trainer, summary, losses = _train(tmp_path, f"--model.name={family}")
    assert trainer.plan.model_name == family
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] and all(math.isfinite(v) for v in losses.values())
    assert summary["best_val_bpb"] is not None and 0 < summary["best_val_bpb"] < 10
    assert (tmp_path / "d2" / "step-000008").is_dir()
    if family == "llama":
        assert isinstance(trainer.model, Llama)
        assert set(trainer.model.optimizer_param_groups()) == set(trainer.plan.groups) == \
            {"lm_head", "wte", "norms", "matrices"}


def test_llama_resume_is_bitwise_and_export_round_trips(home, tmp_path):
    _, _, straight = _train(tmp_path / "straight", "--model.name=llama")
    _train(tmp_path / "run", "--model.name=llama", "--debug.stop_after_steps=4")
    _, _, resumed = _train(tmp_path / "run", "--model.name=llama", "--checkpoint.resume_from_step=latest")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == straight[step], step  # bitwise on CPU in fp32

    out = export_checkpoint(tmp_path / "straight" / "d2" / "step-000008", tmp_path / "export")
    model = load_exported(out)
    assert isinstance(model, Llama)
    trainer = train.Trainer(load_config(TINY + [f"--job.dump_folder={tmp_path / 'straight'}", "--model.name=llama",
                                                "--checkpoint.resume_from_step=8"]))
    try:
        idx = torch.randint(0, 512, (2, 16))
        with torch.no_grad():
            assert torch.equal(model(idx), trainer.model.eval()(idx))
    finally:
        trainer.close()


def test_llama_dry_run_prints_its_plan(home, capsys):
    from titanlite.plan import main as plan_main

    assert plan_main(["--job.config_file", "train_configs/llama_debug_cpu.toml", "--model.depth=26"]) == 0
    out = capsys.readouterr().out
    # depth 26: width 64 x 26 = 1664 (13 heads of 128; 13 is prime, so 1 kv head), SwiGLU 8/3 x 1664 = 4437.3 -> 4608
    assert "model             : llama | depth 26 | width 1,664 | heads 13 x 128 (kv heads 1) | ffn 4,608" in out
    assert "Memory per GPU (estimate; one device, no FSDP" in out  # models/llama/memory.py
