"""The trainer end to end on a tiny model and the embedded corpus (fp32, a few steps, one process)."""

import json

import pytest
import torch

from tests.helpers.runs import isolated_cache
from titanlite import train
from titanlite.config import load_config
from titanlite.errors import UserError

TINY = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=4", "--training.total_batch_size=256", "--training.num_iterations=6",
    "--data.vocab_size=512", "--eval.eval_every=3", "--eval.eval_tokens=1024", "--eval.sample_every=6",
    "--eval.core_metric_every=-1", "--metrics.log_every=1", "--compile.enabled=false",
    "--lr_scheduler.warmup_steps=0",
]


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    yield from isolated_cache(tmp_path_factory)



def _config(tmp_path, *extra):
    return load_config(TINY + [f"--job.dump_folder={tmp_path}", *extra])


def test_tiny_run_end_to_end_metrics_tensorboard_summary(tmp_path, captured):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path)
    assert train.run_training(config) == 0
    run_dir = tmp_path / "d2"

    text = "\n".join(captured)
    assert "CPU: " in text and "Peak FLOPS (FP32 matmul): " in text
    assert "Vocab size: 512" in text
    assert any(line.startswith("WARNING: Flash Attention 3 not available") for line in captured)
    step_lines = [line for line in captured if line.startswith("step 00006/00006")]
    assert step_lines, text
    for field in ("(100.00%)", "| loss: ", "| lrm: ", "| dt: ", "| tok/sec: ", "| mfu: ", "epoch: 1 shard: ",
                  "| total time: ", "| eta: "):
        assert field in step_lines[0]
    assert "Peak memory usage:" in text and "Total training time:" in text and "Minimum validation bpb:" in text
    assert sum(line.startswith("  sample: ") for line in captured) == 7

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lrm", "train/tok_per_sec", "train/mfu", "train/dt", "total_training_flops",
                "total_training_time", "val/bpb"):
        assert tag in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val/bpb")] == [0, 3, 6]
    assert "samples" in "".join(acc.Tags()["tensors"])
    flops = acc.Scalars("total_training_flops")[-1]
    assert flops.value == pytest.approx(6 * 256 * TINY_FLOPS_PER_TOKEN, rel=1e-6)  # 6 steps of 256 tokens

    summary = json.loads((run_dir / "summary.json").read_text())
    bpbs = [e.value for e in acc.Scalars("val/bpb")]
    assert summary["final_val_bpb"] == pytest.approx(bpbs[-1], rel=1e-6)
    assert summary["best_val_bpb"] == pytest.approx(min(bpbs), rel=1e-6)
    assert summary["tokens"] == 6 * 256 and summary["steps"] == 6
    assert bpbs[-1] < bpbs[0]  # it learns
    assert (run_dir / "config.toml").is_file()
    assert load_config(["--job.config_file", str(run_dir / "config.toml")]).model == config.model


# TINY's FLOPs per token by hand (docs/recipe.md §2.2): width 2 x 32 = 64 (2 heads of 32), 2 layers, vocab 512, T 64.
#   matmul weights: blocks 2 x 12 x 64^2 = 98,304; ve_gate on layer 1 only 12 x 2 = 24; lm_head 512 x 64 = 32,768;
#   smear gate 24 -> 6 x 131,120 = 786,720. Attention: S = ceil(64 / 4 / 128) x 128 = 128, so both layers see
#   min(window, 64) = 64 keys: 2 x 12 x 64 x 64 = 98,304.
TINY_FLOPS_PER_TOKEN = 6 * (2 * 12 * 64**2 + 12 * 2 + 512 * 64 + 24) + 2 * 12 * 64 * 64  # = 885,024


def test_plot_run_writes_png(tmp_path):
    from scripts.plot_run import plot_run

    assert train.run_training(_config(tmp_path, "--training.num_iterations=3", "--eval.sample_every=-1")) == 0
    out = plot_run(tmp_path / "d2", tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """1 x B and 4 x (B/4) micro-steps give the same gradients and the same update (fp32, 1e-5)."""
    torch.manual_seed(0)
    rows = torch.randint(0, 512, (8, 65))
    results = []
    for micro in (1, 4):
        # depth 4: at depth 2 the backout layer is the last one, whose gradient is exactly zero (norm(x - l*x)).
        config = _config(tmp_path / str(micro), "--model.depth=4", f"--training.device_batch_size={8 // micro}",
                         "--training.total_batch_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1")
        trainer = train.Trainer(config)
        try:
            assert trainer.plan.grad_accum_steps == micro
            # Perturb the zero-initialised output projections so every parameter gets a real gradient (with
            # zero gradients, Adam's first update is sign(0 +- rounding), which no summation order can match).
            torch.manual_seed(1)
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            chunks = rows.chunk(micro)
            trainer.train_streams = {j: iter([(c[:, :-1], c[:, 1:])]) for j, c in enumerate(chunks)}
            step_fn = trainer.optimizers.step
            grads = {}

            def capture_then_step(index, _step=step_fn):
                grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})
                _step(index)

            trainer.optimizers.step = capture_then_step
            loss = trainer.train_step(0)
            params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            results.append((loss.item(), grads, params))
        finally:
            trainer.close()
    (loss_a, grads_a, params_a), (loss_b, grads_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)
        # AdamW's first update is lr g / (|g| + 1e-10): where |g| is near that eps (a few embedding rows), a
        # summation-order change of 0.5 % in a 1.5e-10 gradient moves the weight by 1e-5, so those elements are
        # held to the gradient check above only
        steady = (grads_a[name].abs() > 1e-8) | (grads_a[name] == 0)
        torch.testing.assert_close(params_a[name][steady], params_b[name][steady], rtol=1e-5, atol=1e-5, msg=name)


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(tmp_path):
    config = _config(tmp_path, "--training.num_iterations=8", "--checkpoint.save_every=2",
                     "--debug.inject_nan_at_step=4", "--eval.eval_every=-1", "--eval.sample_every=-1")
    with pytest.raises(UserError, match=r"the loss became nan at step 4: training diverged; the last good "
                                        r"checkpoint, step-000004"):
        train.run_training(config)
    steps = sorted(p.name for p in (tmp_path / "d2").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-000002", "step-000004"]


def test_out_of_memory_becomes_one_line_with_smaller_batch(tmp_path, monkeypatch):
    def boom(self, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train.Trainer, "train_step", boom)
    with pytest.raises(UserError, match=r"out of memory on cpu at training.device_batch_size=4: reduce it, "
                                        r"e.g. --training.device_batch_size=2"):
        train.run_training(_config(tmp_path, "--eval.eval_every=-1", "--eval.sample_every=-1"))


def test_out_of_memory_advice_is_next_smaller_power_of_two():
    from titanlite.device import out_of_memory_message

    assert "device_batch_size=16 " in out_of_memory_message(32, torch.device("cuda", 0))
    assert "device_batch_size=16 " in out_of_memory_message(24, torch.device("cpu"))
    assert "device_batch_size=1 " in out_of_memory_message(2, torch.device("cpu"))


def test_missing_device_is_a_clear_error():
    from titanlite.device import resolve_device_type

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="training.device_type = 'cuda' but no CUDA GPU is visible"):
        resolve_device_type("cuda")
    assert resolve_device_type("") == "cpu"


def test_dry_run_prints_plan_for_d26_without_weights(captured):
    config = load_config(["--job.config_file", "gpt2_d26.toml", "--job.dry_run=true"])
    assert train.run_training(config) == 0
    text = "\n".join(captured)
    # docs/recipe.md §2.3, d26 row: total params 1,681,786,938, scaling params 918,423,532, FLOPs/token 5.9911e9,
    # auto batch 2^20; §1.1: width 1664, 13 heads
    assert "Plan for depth 26:" in captured
    assert "width 1,664" in text and "heads 13 x 128" in text
    assert "total 1,681,786,938" in text and "scaling params    : 918,423,532" in text
    assert "  FLOPs per token   : 5.9911e+09" in captured
    # gpt2_d26.toml: ratio 8.25, device batch 16, one process: 2^20 = 16 x 2,048 x 1 x 32 micro-steps;
    # steps int(8.25 x 918,423,532) // 2^20 = 7,576,994,139 // 1,048,576 = 7,225
    assert "  tokens per step   : 1,048,576 (auto, 2^20) = 16 seqs x 2,048 tokens x 1 ranks x 32 micro-steps" \
        in captured
    assert 8.25 * 918_423_532 // 2**20 == 7225
    assert "  iterations        : 7,225 (from training.target_param_data_ratio)" in captured
    assert f"  total tokens      : {7225 * 2**20:,}" in captured
    # batch LR scale sqrt(2^20 / 2^19); width scale (1664 / 768)^-0.5 = 0.6794
    assert f"  LR scales         : batch {2 ** 0.5:.4f} | width {(1664 / 768) ** -0.5:.4f}" in captured


def test_core_during_training_and_base_eval_on_the_checkpoint(tmp_path, captured):
    """CORE runs in the loop (terminal + TensorBoard per task); base_eval reproduces the final val_bpb."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scripts import base_eval
    from tests.unit.test_core import write_bundle

    bundle = tmp_path / "bundle"
    write_bundle(bundle)
    config = _config(tmp_path, "--training.num_iterations=4", "--eval.eval_every=4", "--eval.sample_every=-1",
                     "--eval.core_metric_every=2", f"--eval.eval_bundle_dir={bundle}")
    assert train.run_training(config) == 0
    core_lines = [line for line in captured if " | CORE" in line]
    assert len(core_lines) == 2  # step 2 and the last step
    acc = EventAccumulator(str(tmp_path / "d2" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("core_metric")] == [2, 4]
    assert any(tag.startswith("core/") for tag in acc.Tags()["scalars"])
    final_bpb = acc.Scalars("val/bpb")[-1].value

    captured.clear()
    assert base_eval.main(["--run-dir", str(tmp_path / "d2"), "--split-tokens", "1024",
                           "--bundle", str(bundle)]) == 0
    val_line = next(line for line in captured if line.startswith("val bpb: "))
    assert float(val_line.split()[2]) == pytest.approx(final_bpb, rel=1e-5)
    assert any(line.startswith("train bpb: ") for line in captured)
    assert sum(line.startswith("  sample: ") for line in captured) == 7
    assert sum(line.startswith("  unconditional ") for line in captured) == 8
    csv = (tmp_path / "d2" / "base_eval" / "core_step000004.csv").read_text()
    assert "CORE" in csv


def test_base_eval_without_checkpoint_is_a_clear_error(tmp_path):
    from scripts import base_eval

    with pytest.raises(UserError, match="holds no complete checkpoint"):
        base_eval.main(["--run-dir", str(tmp_path / "nothing")])


def test_trainer_runs_with_compile_and_float8_emulation(tmp_path, captured):
    config = _config(tmp_path, "--training.num_iterations=2", "--eval.eval_every=2", "--eval.sample_every=2",
                     "--compile.enabled=true", "--float8.enabled=true", "--float8.emulate=true",
                     "--model.aspect_ratio=64", "--model.head_dim=64")
    assert train.run_training(config) == 0
    text = "\n".join(captured)
    assert "step 00002/00002" in text and "validation bpb" in text
    assert "float8" in text.lower()
    assert sum(line.startswith("  sample: ") for line in captured) == 7  # KV-cache decoding bypasses compile


def test_wandb_run_without_wandb_installed_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from titanlite.config import load_config as load
    from titanlite.metrics import MetricsLogger

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    metrics_cfg = load(["--metrics.run=myrun", "--metrics.tensorboard=false"]).metrics
    with pytest.raises(UserError, match=r"metrics.run is 'myrun' but wandb is not installed: pip install "
                                        r"'titanlite\[wandb\]', or use --metrics.run=dummy"):
        MetricsLogger(metrics_cfg, tmp_path, {}, enabled=True)
    MetricsLogger(metrics_cfg, tmp_path, {}, enabled=False)  # other ranks never touch W&B


def test_host_reads_of_tensors_happen_only_on_logging_steps(tmp_path, monkeypatch):
    """On a GPU every .item()/float()/bool() of a device tensor stalls the queue: the loop must read values only
    on logging (and checking) steps. The data loader works on host tensors before the copy, so it is exempt."""
    import sys

    trainer = train.Trainer(_config(tmp_path, "--metrics.log_every=4", "--training.num_iterations=8",
                                    "--eval.eval_every=-1", "--eval.sample_every=-1", "--checkpoint.enabled=false"))
    reads = []

    def recording(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "titanlite" in caller and "/data/" not in caller:
                reads.append((trainer.state.step, name))
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    trainer.train()
    trainer.close()
    steps_with_reads = sorted({step for step, _ in reads})
    # state.step is already advanced when a step's loss is read: reads after steps 4 and 8 only
    assert steps_with_reads == [4, 8], reads
