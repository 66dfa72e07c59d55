"""`python -m titanlite.train --job.config_file FILE [--section.key=value ...]`: the entry point and the loop.

Order (DESIGN.md): config -> device/world -> data + tokenizer -> plan -> model on meta -> parallelize
(float8, AC, compile, FSDP) -> materialise + init -> optimizers -> loaders -> resume -> loop. Each component
gets only its own config section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

from titanlite.cli import run_cli
from titanlite.config import config_to_toml, help_text, load_config
from titanlite.errors import UserError
from titanlite.logging_utils import init_logger, logger
from titanlite.train_state import TrainState

TIMING_WARMUP_STEPS = 10  # total_training_time skips steps 0-10 (compile/warm-up), as the leaderboard does


def _due(step: int, every: int, last: bool, at_zero: bool) -> bool:
    if every <= 0:
        return False
    return last or (step % every == 0 and (at_zero or step > 0))


class Trainer:
    def __init__(self, config):
        from titanlite.data.corpora import prepare_corpus, prepare_tokenizer
        from titanlite.device import prepare_backend, resolve_device_type
        from titanlite.distributed import init_distributed, set_seed
        from titanlite.metrics import MetricsLogger, describe_device
        from titanlite.precision import describe_compute_dtype, resolve_compute_dtype
        from titanlite.scaling import derive_plan, format_plan

        self.config = cfg = config
        device_type = resolve_device_type(cfg.training.device_type)
        prepare_backend(device_type)
        self.world = world = init_distributed(cfg.parallelism, device_type)
        self.device = world.device
        self.is_main = world.rank == 0
        set_seed(cfg.training.seed)
        self.compute_dtype = resolve_compute_dtype(cfg.training.dtype, device_type)
        self.device_info = describe_device(self.device, self.compute_dtype)
        logger.info(self.device_info.line)
        logger.info(describe_compute_dtype(self.compute_dtype, device_type))

        # Data first: the tokenizer fixes the vocab size the plan depends on. Rank 0 prepares, the rest wait.
        if self.is_main:
            self.data_dir = prepare_corpus(cfg.data)
            self.tokenizer = prepare_tokenizer(cfg.data)
        world.barrier()
        if not self.is_main:
            self.data_dir = prepare_corpus(cfg.data)
            self.tokenizer = prepare_tokenizer(cfg.data)
        vocab_size = self.tokenizer.vocab_size
        logger.info(f"Vocab size: {vocab_size:,}")
        self.token_bytes = self.tokenizer.token_bytes().to(self.device)

        self.plan = plan = derive_plan(cfg.model, cfg.training, cfg.optimizer, vocab_size, world.world_size)
        self._build_model()
        logger.info(format_plan(plan))

        self.run_dir = Path(cfg.job.dump_folder) / (cfg.checkpoint.model_tag or f"d{cfg.model.depth}")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        self.metrics = MetricsLogger(cfg.metrics, self.run_dir, dataclasses.asdict(cfg), enabled=self.is_main)
        self._build_optimizers()
        self._build_loaders()
        self.state = TrainState()
        self.loss_history: list[tuple[int, float]] = []  # (step, global mean loss) of every logged step
        from titanlite.checkpoint import CheckpointManager

        self.checkpointer = CheckpointManager(cfg.checkpoint, self.run_dir, world)
        self.resumed_step = self._maybe_resume()

    # ---- construction -----------------------------------------------------------------------------------
    def _build_model(self) -> None:
        from titanlite.attention import select_attention_backend
        from titanlite.models.gpt.parallelize import materialize
        from titanlite.spec import get_train_spec

        cfg = self.config
        self.spec = spec = get_train_spec(cfg.model.name)
        backend, lines = select_attention_backend(cfg.model.attention_backend, self.device.type,
                                                  self.compute_dtype, cfg.model.window_pattern.upper())
        for line in lines:
            logger.info(line)
        model = spec.build_meta_model(self.plan, cfg.model)
        if hasattr(model, "set_compute_dtype"):
            model.set_compute_dtype(self.compute_dtype)
        if hasattr(model, "set_attention_backend"):
            model.set_attention_backend(backend)
        if spec.parallelize is not None:
            model = spec.parallelize(model, self.world, cfg.compile, cfg.float8, cfg.activation_checkpoint,
                                     param_dtype=self.compute_dtype)
        self.model = materialize(model, self.device)
        self.loss_fn = spec.loss_fn()

    def _build_optimizers(self) -> None:
        from titanlite.optim import build_optimizers

        cfg = self.config
        build = self.spec.build_optimizers or build_optimizers
        self.optimizers = build(self.model.optimizer_param_groups(), cfg.optimizer, self.plan, cfg.lr_scheduler,
                                compute_dtype=self.compute_dtype)

    def _build_loaders(self) -> None:
        """World-size-invariant data: the global batch is made of `streams` fixed micro-batch streams.

        Stream j reads row groups j, j+S, ... of the train split. Rank r owns the grad-accum streams
        r*A .. r*A+A-1, so 2 ranks x 2 micro-steps and 1 rank x 4 micro-steps see the same global batch and a
        checkpoint can be resumed on a different number of processes with the same data.
        """
        from titanlite.data.loader import build_loader

        cfg, plan, world = self.config, self.plan, self.world
        accum = plan.grad_accum_steps
        self.num_streams = world.world_size * accum
        first = world.rank * accum
        threads = max(1, cfg.data.loader_threads // accum)
        self.train_streams = {
            j: build_loader(self.data_dir, "train", self.tokenizer, plan.device_batch_size, plan.seq_len,
                            rank=j, world_size=self.num_streams, device=self.device,
                            buffer_docs=cfg.data.buffer_docs, threads=threads)
            for j in range(first, first + accum)}
        self.val_loader = build_loader(self.data_dir, "val", self.tokenizer, plan.device_batch_size,
                                       plan.seq_len, rank=world.rank, world_size=world.world_size,
                                       device=self.device, buffer_docs=cfg.data.buffer_docs, prefetch=0,
                                       threads=cfg.data.loader_threads)
        self.eval_steps = max(1, cfg.eval.eval_tokens // (plan.device_batch_size * plan.seq_len * world.world_size))

    def _checkpoint_states(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizers, "train_state": self.state,
                "dataloader": {f"stream_{j}": json.dumps(loader.state_dict())
                               for j, loader in self.train_streams.items()}}

    def _maybe_resume(self) -> int | None:
        requested = self.config.checkpoint.resume_from_step.strip().lower()
        if requested in ("-1", ""):
            return None
        states = self._checkpoint_states()
        step = self.checkpointer.load("latest" if requested == "latest" else int(requested), states)
        for key, loader in self.train_streams.items():
            loader.load_state_dict(json.loads(states["dataloader"][f"stream_{key}"]))
        logger.info(f"Resumed from {self.run_dir}/step-{step:06d} (step {self.state.step}, "
                    f"{self.state.tokens_seen:,} tokens seen)")
        return self.state.step

    # ---- evaluation -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_context(self, eager: bool = False):
        """Float8 layers run in bf16 for evaluation; `eager` also bypasses compiled blocks (KV-cache decoding
        changes shapes every token, which would only churn through recompilations)."""
        from titanlite.float8 import bf16_eval

        with contextlib.ExitStack() as stack:
            stack.enter_context(bf16_eval(self.model))
            if eager:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            yield

    def evaluate_val_bpb(self, step: int) -> None:
        from titanlite.eval.bpb import evaluate_bpb

        self.model.eval()
        self.val_loader.reset()
        with self._eval_context():
            bpb = evaluate_bpb(self.model, iter(self.val_loader), self.eval_steps, self.token_bytes)
        self.model.train()
        self.state.last_val_bpb = bpb
        self.state.min_val_bpb = min(self.state.min_val_bpb, bpb)
        logger.info(f"step {step:05d} | validation bpb: {bpb:.6f}")
        self.metrics.scalars(step, {"val/bpb": bpb, "total_training_flops": self._flops_so_far(step),
                                    "total_training_time": self.state.total_training_time})

    def evaluate_core(self, step: int) -> None:
        from titanlite.eval.core import evaluate_core
        from titanlite.paths import cache_dir

        bundle = Path(self.config.eval.eval_bundle_dir or cache_dir() / "eval_bundle")
        if not (bundle / "core.yaml").is_file():
            logger.info(f"step {step:05d} | CORE: not available (no eval bundle at {bundle}; run "
                        f"scripts/download_eval_bundle.py or scripts/prepare_core_offline.py)")
            return
        self.model.eval()
        with self._eval_context(eager=True):
            result = evaluate_core(self.model, self.tokenizer, bundle, self.config.eval.core_metric_max_per_task,
                                   device=self.device, rank=self.world.rank, world_size=self.world.world_size,
                                   max_seq_len=self.plan.seq_len)
        self.model.train()
        self.state.last_core = result.core
        logger.info(f"step {step:05d} | {result.label}: {result.core:.4f} ({result.examples_per_second:.1f} ex/s)")
        values = {"core_metric": result.core, "total_training_flops": self._flops_so_far(step)}
        values.update({f"core/{task}": score for task, score in result.centered.items()})
        self.metrics.scalars(step, values)

    def sample(self, step: int) -> None:
        from titanlite.eval.samples import sample_completions

        self.model.eval()
        with self._eval_context(eager=True):
            completions = sample_completions(self.model, self.tokenizer)
        self.model.train()
        for text in completions:
            logger.info(f"  sample: {text!r}")
        self.metrics.text(step, "samples", "\n\n".join(completions))

    def _flops_so_far(self, step: int) -> float:
        return float(self.plan.flops_per_token) * self.plan.total_batch_size * step

    # ---- the loop ---------------------------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over the global batch; returns the step's mean loss (a device tensor, no sync)."""
        self.optimizers.zero_grad(set_to_none=True)
        global_tokens = self.plan.total_batch_size  # no ignored targets in training rows
        step_loss = torch.zeros((), device=self.device, dtype=torch.float32)
        for loader in self.train_streams.values():
            inputs, targets = next(loader)
            loss_sum = self.loss_fn(self.model, inputs, targets)
            (loss_sum / global_tokens).backward()
            step_loss += loss_sum.detach().float()
        if step == self.config.debug.inject_nan_at_step:
            step_loss = step_loss * float("nan")
        self.optimizers.step(step)
        return step_loss / global_tokens

    def _global_loss(self, local_mean: torch.Tensor) -> float:
        return float(self.world.all_reduce_sum(local_mean.clone()).item())  # clone: all_reduce works in place

    def _check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            latest = self.checkpointer.latest_step()
            kept = (f"the last good checkpoint, step-{latest:06d} in {self.run_dir}, is untouched"
                    if latest is not None else "no checkpoint was written")
            raise UserError(f"the loss became {loss} at step {step}: training diverged; {kept}. Lower the "
                            f"learning rates (e.g. --optimizer.matrix_lr) or check the data")

    def _position(self) -> str:
        pos = next(iter(self.train_streams.values())).position()
        return f"epoch: {pos['epoch']} shard: {pos['shard']} rg: {pos['row_group']}"

    def _save(self, step: int, final: bool) -> None:
        if not self.config.checkpoint.enabled:
            return
        self.checkpointer.save(step, self._checkpoint_states(), final=final)
        logger.info(f"step {step:05d} | checkpoint saved to {self.run_dir}/step-{step:06d}")

    def train(self) -> dict:
        cfg, plan, state = self.config, self.plan, self.state
        num_iterations = plan.num_iterations
        ev = cfg.eval
        unchecked_loss: torch.Tensor | None = None  # sum of step losses not yet checked for NaN/inf
        step_start: float | None = None            # end of the previous step; None after a pause (eval)
        while True:
            step = state.step
            last = step == num_iterations
            evals = (_due(step, ev.eval_every, last, at_zero=True), _due(step, ev.core_metric_every, last, False),
                     _due(step, ev.sample_every, last, at_zero=False))
            save = last or (_due(step, cfg.checkpoint.save_every, False, at_zero=False)
                            and step != self.resumed_step)
            stop = last or step == cfg.debug.stop_after_steps
            if unchecked_loss is not None and (any(evals) or save or stop):
                self._check_finite(self._global_loss(unchecked_loss), step - 1)  # never save a diverged model
                unchecked_loss = None
            if any(evals):
                self._synchronize()
                if evals[0]:
                    self.evaluate_val_bpb(step)
                if evals[1]:
                    self.evaluate_core(step)
                if evals[2]:
                    self.sample(step)
                step_start = None
            if save:
                self._save(step, final=last)
                step_start = None
            if stop:
                break
            if step_start is None:
                self._synchronize()
                step_start = time.perf_counter()

            local_loss = self.train_step(step)
            state.step = step + 1
            state.tokens_seen += plan.total_batch_size
            if step == 0:  # the reference's GC policy: freeze what exists after the first step
                gc.collect()
                gc.freeze()
                gc.disable()
            elif state.step % cfg.training.gc_every == 0:
                gc.collect()  # every rank at the same step, so no rank stalls a collective alone

            log_now = state.step % cfg.metrics.log_every == 0 or state.step == num_iterations
            if log_now:
                self._synchronize()  # the only host sync of a step, and only on logging steps
            step_end = time.perf_counter()
            dt = step_end - step_start  # consecutive steps tile the wall clock, so the sum stays exact
            step_start = step_end
            if state.step > TIMING_WARMUP_STEPS:
                state.total_training_time += dt
            unchecked_loss = local_loss if unchecked_loss is None else unchecked_loss + local_loss
            if log_now:
                self._check_finite(self._global_loss(unchecked_loss), step)
                unchecked_loss = None
                loss = self._global_loss(local_loss)
                self.loss_history.append((state.step, loss))
                self._log_step(state.step, loss, dt)
        return self._finish()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_step(self, step: int, loss: float, dt: float) -> None:
        from titanlite.metrics import format_step_line

        plan, state = self.plan, self.state
        ema = state.update_loss(loss)
        tok_per_sec = plan.total_batch_size / dt
        flops_per_sec = plan.flops_per_token * plan.total_batch_size / dt
        mfu = 100.0 * flops_per_sec / (self.device_info.peak_flops * self.world.world_size)
        timed_steps = step - TIMING_WARMUP_STEPS
        eta = (plan.num_iterations - step) * state.total_training_time / timed_steps if timed_steps > 0 else None
        lrm = self.optimizers.current()["lrm"]
        logger.info(format_step_line(step, plan.num_iterations, ema, lrm, dt, tok_per_sec, mfu, self._position(),
                                     state.total_training_time, eta))
        self.metrics.scalars(step, {"train/loss": ema, "train/lrm": lrm, "train/tok_per_sec": tok_per_sec,
                                    "train/mfu": mfu, "train/dt": dt,
                                    "total_training_flops": self._flops_so_far(step),
                                    "total_training_time": state.total_training_time})

    def _finish(self) -> dict:
        from titanlite.metrics import peak_memory_mib

        state, plan = self.state, self.plan
        peak = peak_memory_mib(self.device)
        logger.info(f"Peak memory usage: {peak:.2f} MiB")
        logger.info(f"Total training time: {state.total_training_time / 60:.2f}m")
        best = f"{state.min_val_bpb:.6f}" if math.isfinite(state.min_val_bpb) else "n/a (no evaluation ran)"
        logger.info(f"Minimum validation bpb: {best}")
        if not math.isnan(state.last_core):
            logger.info(f"Final CORE: {state.last_core:.4f}")
        summary = {
            "config": dataclasses.asdict(self.config),
            "plan": {k: v for k, v in vars(plan).items() if isinstance(v, (int, float, str, dict, tuple))},
            "final_val_bpb": _finite_or_none(state.last_val_bpb),
            "best_val_bpb": _finite_or_none(state.min_val_bpb),
            "core": _finite_or_none(state.last_core),
            "steps": state.step,
            "total_training_time_s": state.total_training_time,
            "total_flops": float(plan.flops_per_token) * state.tokens_seen,
            "tokens": state.tokens_seen,
            "peak_memory_mib": peak,
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    def close(self) -> None:
        gc.unfreeze()
        gc.enable()
        for loader in list(self.train_streams.values()) + [self.val_loader]:
            if hasattr(loader, "close"):
                loader.close()
        self.checkpointer.close()
        self.metrics.close()


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None



def dry_run(config) -> int:
    """The resolved config and the plan, on the meta device: no data, no weights, no process group."""
    from titanlite.scaling import derive_plan, format_plan

    world_size = config.parallelism.world_size if config.parallelism.world_size > 0 else 1
    plan = derive_plan(config.model, config.training, config.optimizer, config.data.vocab_size, world_size)
    logger.info(format_plan(plan))
    return 0


def run_training(config) -> int:
    if config.job.dry_run:
        return dry_run(config)
    from titanlite.device import is_out_of_memory, out_of_memory_message

    trainer = Trainer(config)
    try:
        trainer.train()
    except (RuntimeError, MemoryError) as exc:
        if is_out_of_memory(exc):
            raise UserError(out_of_memory_message(config.training.device_batch_size, trainer.device)) from None
        raise
    finally:
        trainer.close()
    return 0


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    init_logger()
    config = load_config(argv)
    logger.info("Resolved config:\n" + config_to_toml(config))
    return run_training(config)


def cli_entry(main_fn) -> None:
    """Run `main_fn` as a process entry point: one-line user errors, then a clean distributed teardown."""
    code = run_cli(main_fn)
    from titanlite.distributed import teardown_distributed

    teardown_distributed(code)  # under torchrun: barrier/destroy/os._exit (avoids gloo's exit-time abort)
    sys.exit(code)


def cli_main() -> None:
    cli_entry(main)


if __name__ == "__main__":
    cli_main()
