"""Training runs for tests: a module's prepared cache, a run's losses, the CLI's exit code and output."""

from __future__ import annotations

import contextlib

import pytest


def isolated_cache(tmp_path_factory):
    """For a module-scoped fixture (`yield from`): a fresh, empty $TITANLITE_HOME and one torch thread."""
    import torch

    mp = pytest.MonkeyPatch()
    mp.setenv("TITANLITE_HOME", str(tmp_path_factory.mktemp("titanlite_home")))
    torch.set_num_threads(1)
    try:
        yield
    finally:
        mp.undo()


def prepared_home(tmp_path_factory, argv: list[str]):
    """For a module-scoped fixture (`yield from`): a fresh $TITANLITE_HOME with the corpus and tokenizer of
    `argv` already built, so runs (and spawned ranks) only read them. Yields the folder."""
    from titanlite.config import load_config
    from titanlite.data.corpora import prepare_corpus, prepare_tokenizer

    path = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TITANLITE_HOME", str(path))
    config = load_config(argv)
    prepare_corpus(config.data)
    prepare_tokenizer(config.data)
    try:
        yield path
    finally:
        mp.undo()


@contextlib.contextmanager
def logged_lines():
    """The messages titanlite's logger emits (INFO and up) inside the block, appended to the yielded list; for code
    outside a test function (spawned workers, helpers), where the `captured` fixture cannot reach."""
    import logging

    from titanlite.logging_utils import logger

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def train_losses(argv: list[str]) -> dict[int, float]:
    """{step: global mean loss} of every logged step of a Trainer run on `argv`."""
    from titanlite import train
    from titanlite.config import load_config

    trainer = train.Trainer(load_config(argv))
    try:
        trainer.train()
        return dict(trainer.loss_history)
    finally:
        trainer.close()


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m titanlite.train argv`, run in this process."""
    from titanlite import train
    from titanlite.cli import run_cli as cli

    capsys.readouterr()
    code = cli(train.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(out: str, err: str) -> str:
    """The single stderr line a failure printed (and no traceback anywhere)."""
    assert "Traceback" not in out + err, out[-2000:] + err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def tiny_run_args(num_iterations: int) -> list[str]:
    """A d2 GPT (width 64, T 64, vocab 512) in fp32 on CPU, 256 tokens a step, a line per step, no evaluations:
    the smallest real run the trainer does, for tests of what happens around training."""
    return [
        "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
        "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
        "--training.device_batch_size=2", "--training.total_batch_size=256",
        f"--training.num_iterations={num_iterations}", "--data.vocab_size=512", "--eval.eval_every=-1",
        "--eval.sample_every=-1", "--eval.core_metric_every=-1", "--metrics.log_every=1",
        "--metrics.tensorboard=false", "--compile.enabled=false", "--metrics.peak_flops=1e12",
        "--lr_scheduler.warmup_steps=2",
    ]
