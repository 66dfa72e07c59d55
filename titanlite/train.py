"""`python -m titanlite.train --job.config_file FILE [--section.key=value ...]`: the entry point and the loop.

Order (docs/design.md): config -> device/world -> run-folder lock -> data + tokenizer -> plan -> model on meta ->
parallelize (float8, AC, compile, FSDP) -> materialise + init -> optimizers -> loaders -> resume -> loop. Each
component gets only its own config section. SIGTERM (preemption) makes the loop save at the next step boundary
and exit 143.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titanlite.assemble import assemble_model
from titanlite.checkpoint import CheckpointManager, raise_agreed, remove_interrupted_saves
from titanlite.cli import Stop, run_cli
from titanlite.config import config_to_toml, help_text, load_config
from titanlite.data.corpora import prepare_corpus, prepare_tokenizer, resolve_data_dir, resolve_tokenizer_dir
from titanlite.data.epochs import repeat_warning
from titanlite.data.loader import build_loader
from titanlite.data.streams import TrainData
from titanlite.device import is_out_of_memory, out_of_memory_message, prepare_backend, resolve_device_type
from titanlite.distributed import init_distributed, set_seed, teardown_distributed
from titanlite.elastic import (agreed_resume_inputs, choose_resume, format_fault_costs, lost_peer_line,
                               world_change_line)
from titanlite.errors import UserError
from titanlite.eval.bpb import evaluate_bpb
from titanlite.eval.core import core_line, core_settings, evaluate_core
from titanlite.eval.samples import sample_completions
from titanlite.float8 import bf16_eval
from titanlite.fs_errors import reported_fs_errors
from titanlite.logging_utils import init_logger, logger
from titanlite.metrics import MetricsLogger, describe_device, format_step_line, peak_memory_mib
from titanlite.models import get_train_spec
from titanlite.optim import build_optimizers
from titanlite.parallelize import resolve_compile, set_replica_all_reduce
from titanlite.paths import cache_dir
from titanlite.precision import describe_compute_dtype, resolve_compute_dtype
from titanlite.run_lock import RunLock
from titanlite.save_clock import SaveClock
from titanlite.scaling import derive_plan, format_plan
from titanlite.shared_fs import check_run_folder_shared, check_same_files
from titanlite.step_control import StepControl
from titanlite.train_state import TrainState

TIMING_WARMUP_STEPS = 10  # total_training_time skips steps 0-10 (compile/warm-up), as the leaderboard does
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports: schedulers expect it
RUN_DIR_ADVICE = "point job.dump_folder at a writable folder with free space"


def _due(step: int, every: int, last: bool, at_zero: bool) -> bool:
    if every <= 0:
        return False
    return last or (step % every == 0 and (at_zero or step > 0))


class Trainer:
    def __init__(self, config):
        self.run_lock = None
        try:
            self._setup(config)
        except BaseException:
            if self.run_lock is not None:  # a failed start leaves the folder free for the next try
                self.run_lock.release()
            raise

    def _setup(self, config) -> None:
        self.config = cfg = config
        device_type = resolve_device_type(cfg.training.device_type)
        prepare_backend(device_type)
        self.world = world = init_distributed(cfg.parallelism, device_type)
        self.device = world.device
        self.is_main = world.rank == 0
        set_seed(cfg.training.seed)
        self.compute_dtype = resolve_compute_dtype(cfg.training.dtype, device_type)
        # Rank 0 measures (or reads the cache) first: ranks measuring at once on one host would each see a
        # fraction of the cores and cache a low peak.
        if not self.is_main:
            world.barrier()
        self.device_info = describe_device(self.device, self.compute_dtype, cfg.metrics.peak_flops,
                                           cfg.metrics.remeasure_peak and self.is_main)
        if self.is_main:
            world.barrier()
        logger.info(self.device_info.line)
        logger.info(describe_compute_dtype(self.compute_dtype, device_type))
        # One run per run folder, settled before anything is written into it.
        self.run_dir = Path(cfg.job.dump_folder) / (cfg.checkpoint.model_tag or f"d{cfg.model.depth}")
        self._lock_run_dir()
        check_run_folder_shared(self.run_dir)  # rank 0 alone publishes checkpoints there: every node must see it

        # Data first: the tokenizer fixes the vocab size the plan depends on. Rank 0 prepares, the rest wait.
        if self.is_main:
            self.data_dir = prepare_corpus(cfg.data)
            self.tokenizer = prepare_tokenizer(cfg.data)
        world.barrier()
        check_same_files([("the corpus folder", resolve_data_dir(cfg.data), "data.data_dir (or $TITANLITE_HOME)"),
                          ("the tokenizer folder", resolve_tokenizer_dir(cfg.data),
                           "data.tokenizer_dir (or $TITANLITE_HOME)")])  # before other nodes build their own
        if not self.is_main:
            self.data_dir = prepare_corpus(cfg.data)
            self.tokenizer = prepare_tokenizer(cfg.data)
        vocab_size = self.tokenizer.vocab_size
        logger.info(f"Vocab size: {vocab_size:,}")
        self.token_bytes = self.tokenizer.token_bytes().to(self.device)

        self.spec = get_train_spec(cfg.model.name)
        self.plan = plan = derive_plan(cfg.model, cfg.training, cfg.optimizer, vocab_size, world.world_size,
                                       self.spec)
        self._build_model()
        logger.info(format_plan(plan) + "\n" + format_fault_costs(plan, self.spec, cfg.checkpoint))

        if self.is_main:
            with reported_fs_errors("write", self.run_dir / "config.toml", RUN_DIR_ADVICE):
                (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
        self.metrics = MetricsLogger(cfg.metrics, self.run_dir, dataclasses.asdict(cfg), enabled=self.is_main)
        self._build_optimizers()
        self._build_loaders()
        self.state = TrainState()
        self.loss_history: list[tuple[int, float]] = []  # (step, global mean loss) of every logged step
        self.checkpointer = CheckpointManager(cfg.checkpoint, self.run_dir, world,
                                              tokenizer_fingerprint=self.tokenizer.fingerprint())
        self._sigterm_armed = (cfg.checkpoint.enabled and cfg.checkpoint.save_on_sigterm
                               and threading.current_thread() is threading.main_thread())
        self._sigterm_received = False
        self.save_clock = SaveClock(cfg.checkpoint.save_every_minutes if cfg.checkpoint.enabled else -1)
        # the stop/publish/timed-save decision between steps, agreed across ranks every few steps (_step_boundary)
        self.step_control = StepControl(world.is_distributed, self.is_main,
                                        self._sigterm_armed or self.checkpointer.async_enabled
                                        or self.save_clock.enabled)
        self.resumed_step = self._maybe_resume()

    def _lock_run_dir(self) -> None:
        """Rank 0 locks the run folder and clears what interrupted saves left there; every rank learns whether
        that worked."""
        error = None
        if self.is_main:
            try:
                self.run_lock = RunLock(self.run_dir).acquire()
                with reported_fs_errors("clear interrupted saves in", self.run_dir, RUN_DIR_ADVICE):
                    remove_interrupted_saves(self.run_dir)
            except UserError as exc:
                error = str(exc)
        raise_agreed(error)

    # ---- construction -----------------------------------------------------------------------------------
    def _build_model(self) -> None:
        plan, world = self.plan, self.world
        compile_cfg, line = resolve_compile(
            self.config.compile, self.device.type, processes=world.world_size, compute_dtype=self.compute_dtype,
            train_flops=float(plan.num_iterations) * plan.total_batch_size * plan.flops_per_token,
            peak_flops=self.device_info.peak_flops)
        if line:
            logger.info(line)
        config = dataclasses.replace(self.config, compile=compile_cfg)  # auto settled; the saved config keeps auto
        self.model = assemble_model(self.spec, plan.model_args, config, world, self.compute_dtype)
        self.loss_fn = self.spec.loss

    def _build_optimizers(self) -> None:
        cfg = self.config
        self.optimizers = build_optimizers(self.model.optimizer_param_groups(), cfg.optimizer, self.plan,
                                           cfg.lr_scheduler, compute_dtype=self.compute_dtype)

    def _build_loaders(self) -> None:
        """Layout-invariant data (data/streams.py): one packing stream per row of the global batch; this rank
        holds the streams of its rows and each micro-step stacks its B of them. Any device_batch_size and
        process count dividing the same global batch read the same rows, so a checkpoint resumes under any."""
        cfg, plan, world = self.config, self.plan, self.world
        accum = plan.grad_accum_steps
        self.train_data = TrainData(
            self.data_dir, self.tokenizer, rows=plan.total_batch_size // plan.seq_len, seq_len=plan.seq_len,
            device_batch_size=plan.device_batch_size, grad_accum=accum, rank=world.rank,
            world_size=world.world_size, device=self.device, buffer_docs=cfg.data.buffer_docs,
            threads=max(1, cfg.data.loader_threads // accum))
        self.train_streams = self.train_data.loaders  # micro-step -> loader; train_step takes one batch of each
        if self.is_main:  # where the plan meets the data: a corpus the run would read many times over is said
            warning = repeat_warning(self.data_dir, self.train_data.index, self.tokenizer,
                                     plan.total_batch_size * plan.num_iterations)
            if warning:
                logger.warning(warning)
        self.val_loader = build_loader(self.data_dir, "val", self.tokenizer, plan.device_batch_size,
                                       plan.seq_len, rank=world.rank, world_size=world.world_size,
                                       device=self.device, buffer_docs=cfg.data.buffer_docs, prefetch=0,
                                       threads=cfg.data.loader_threads)
        self.eval_steps = max(1, cfg.eval.eval_tokens // (plan.device_batch_size * plan.seq_len * world.world_size))

    def _checkpoint_states(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizers, "train_state": self.state,
                "dataloader": self.train_data.checkpoint_entry()}

    def _maybe_resume(self) -> int | None:
        # a torchrun restart (or `auto`) resumes the latest checkpoint, as rank 0 sees the folder
        latest, restarts = agreed_resume_inputs(self.checkpointer)
        choice = choose_resume(self.config.checkpoint.resume_from_step, latest, self.run_dir, restarts)
        if choice.line:
            logger.info(choice.line)
        if choice.step is None:
            return None
        step = self.checkpointer.resolve_step(choice.step)
        states = self._checkpoint_states()
        # a changed global batch or sequence length is refused by name before anything loads
        with_data = self.train_data.check_checkpoint(self.checkpointer.step_dir(step))
        states["dataloader"] = self.train_data.load_keys()
        if not with_data:
            del states["dataloader"]  # an older checkpoint's data state: the data starts over (warned)
        step = self.checkpointer.load(step, states)
        if with_data:
            self.train_data.load(states["dataloader"])
        logger.info(f"Resumed from {self.run_dir}/step-{step:06d} (step {self.state.step}, "
                    f"{self.state.tokens_seen:,} tokens seen)")
        changed = world_change_line(self.checkpointer.step_dir(step), step, self.plan)
        if changed:
            logger.info(changed)
        return self.state.step

    # ---- evaluation -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_context(self, eager: bool = False):
        """Float8 layers run in bf16 for evaluation; `eager` also bypasses compiled blocks (KV-cache decoding
        changes shapes every token, which would only churn through recompilations)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(bf16_eval(self.model))
            if eager:
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            yield

    def evaluate_val_bpb(self, step: int) -> None:
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
        bundle = Path(self.config.eval.eval_bundle_dir or cache_dir() / "eval_bundle")
        if not (bundle / "core.yaml").is_file():
            logger.info(f"step {step:05d} | CORE: not available (no eval bundle at {bundle}; run "
                        f"scripts/download_eval_bundle.py or scripts/prepare_core_offline.py)")
            return
        # a sharded model was given FSDP param_dtype = the training compute dtype (_build_model), which FSDP
        # imposes on the sharded blocks whatever the model's compute dtype says
        sharded = any(isinstance(p, DTensor) for p in self.model.parameters())
        settings = core_settings(self.config.eval, self.plan.seq_len, self.device.type,
                                 fsdp_param_dtype=self.compute_dtype if sharded else None)
        self.model.eval()
        with self._eval_context(eager=True):  # eager: CORE's shapes and dtype would only churn recompilations
            result = evaluate_core(self.model, self.tokenizer, bundle, self.config.eval.core_metric_max_per_task,
                                   device=self.device, rank=self.world.rank, world_size=self.world.world_size,
                                   max_seq_len=settings.crop_len, dtype=settings.dtype)
        self.model.train()
        self.state.last_core = result.core
        logger.info(f"step {step:05d} | {core_line(result, settings.note)}")
        values = {"core_metric": result.core, "total_training_flops": self._flops_so_far(step)}
        values.update({f"core/{task}": score for task, score in result.centered.items()})
        self.metrics.scalars(step, values)

    def sample(self, step: int) -> None:
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
        loaders = list(self.train_streams.values())
        for micro, loader in enumerate(loaders):
            set_replica_all_reduce(self.model, micro == len(loaders) - 1)  # HSDP: across replicas once per step
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
        return self.train_data.position()

    def _save(self, step: int, final: bool) -> None:
        if not self.config.checkpoint.enabled:
            return
        # "checkpoint saved" is printed by the checkpointer once the folder is complete (async: later)
        self.checkpointer.save(step, self._checkpoint_states(), final=final)
        self.save_clock.reset()

    def _step_boundary(self) -> tuple[bool, bool]:
        """Between steps: publish a finished async save; return whether any rank got SIGTERM and whether any
        rank's save clock (checkpoint.save_every_minutes) says a save is due.

        Both are decided on all ranks together, so every rank publishes, saves and stops at the same step (the
        save is collective): with several processes one small all-reduce on a CPU group, about once a second
        (titanlite.step_control), not every step.
        """
        pending = self.checkpointer.pending_done()
        if not self._sigterm_armed and pending is None and not self.save_clock.enabled:
            return False, False
        if not self.step_control.due(self.state.step):
            return False, False
        stop, unfinished, timed = self.step_control.agree(self.state.step, self._sigterm_received,
                                                          pending is False, self.save_clock.due())
        if pending is not None and not unfinished:
            self.checkpointer.wait()  # prints "checkpoint saved", or raises the failure as one line
        return stop, timed

    @contextlib.contextmanager
    def _sigterm_handler(self):
        """SIGTERM (a scheduler's preemption notice) only sets a flag; the loop saves and stops at the next
        step boundary (_step_boundary)."""
        if not self._sigterm_armed:
            yield
            return

        def note(signum, frame):
            self._sigterm_received = True

        previous = signal.signal(signal.SIGTERM, note)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _preempted(self, step: int, saved: bool) -> Stop:
        where = (f"checkpoint saved to {self.checkpointer.step_dir(step)}" if saved else
                 f"no step since the checkpoint {self.checkpointer.step_dir(step)}, nothing new to save"
                 if self.checkpointer.step_dir(step).is_dir() else "no step done, nothing to save")
        line = f"stopped by SIGTERM after step {step}: {where}; resume with --checkpoint.resume_from_step=latest"
        return Stop(line if self.is_main else "", SIGTERM_EXIT_CODE)

    def train(self) -> dict:
        with self._sigterm_handler():
            return self._loop()

    def _loop(self) -> dict:
        cfg, plan, state = self.config, self.plan, self.state
        num_iterations = plan.num_iterations
        ev = cfg.eval
        unchecked_loss: torch.Tensor | None = None  # sum of step losses not yet checked for NaN/inf
        self.save_clock.reset()  # the work a fault can cost starts with the loop, not with the set-up
        step_start: float | None = None            # end of the previous step; None after a pause (eval)
        while True:
            step = state.step
            last = step == num_iterations
            preempted, timed_save = self._step_boundary()
            evals = (_due(step, ev.eval_every, last, at_zero=True), _due(step, ev.core_metric_every, last, False),
                     _due(step, ev.sample_every, last, at_zero=False))
            if preempted:
                evals = (False, False, False)  # the grace period is for the checkpoint
            save = last or (step != self.resumed_step
                            and (_due(step, cfg.checkpoint.save_every, False, at_zero=False)
                                 or ((preempted or timed_save) and step > 0)))
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
                self._save(step, final=last or preempted)
                step_start = None
            if preempted:
                raise self._preempted(step, saved=save and self.config.checkpoint.enabled)
            if stop:
                break
            if step_start is None:
                self._synchronize()
                step_start = time.perf_counter()

            local_loss = self.train_step(step)
            state.step = step + 1
            state.tokens_seen += plan.total_batch_size
            # the reference's GC policy: freeze what exists after the first step this process runs (a resumed
            # run's first step is the resumed one, not step 0)
            if step == (self.resumed_step or 0):
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
            with reported_fs_errors("write", self.run_dir / "summary.json", RUN_DIR_ADVICE):
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    def close(self, failed: bool = False) -> None:
        """Release everything; `failed`: after an error, when the ranks may no longer meet, so an async save
        still in flight is left unpublished (its `.tmp` is cleared by the next run) and a TensorBoard close
        error does not hide the first one."""
        gc.unfreeze()
        gc.enable()
        try:
            for loader in list(self.train_streams.values()) + [self.val_loader]:
                if hasattr(loader, "close"):
                    loader.close()
            if failed:
                self.checkpointer.abandon_pending()
                with contextlib.suppress(UserError):
                    self.metrics.close()
            else:
                self.checkpointer.close()
                self.metrics.close()
        finally:
            if self.run_lock is not None:
                self.run_lock.release()


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None



def dry_run(config) -> int:
    """The resolved config and the plan, on the meta device: no data, no weights, no process group."""
    world_size = config.parallelism.world_size if config.parallelism.world_size > 0 else 1
    plan = derive_plan(config.model, config.training, config.optimizer, config.data.vocab_size, world_size)
    logger.info(format_plan(plan))
    return 0


def run_training(config) -> int:
    if config.job.dry_run:
        return dry_run(config)
    trainer = Trainer(config)
    failed = True
    try:
        trainer.train()
        failed = False
    except Stop:
        failed = False  # a collective stop (SIGTERM): every rank is here, the checkpoint is complete
        raise
    except (RuntimeError, MemoryError) as exc:
        if is_out_of_memory(exc):
            from titanlite.plan_simulate import oom_simulation_hint
            raise UserError(out_of_memory_message(trainer.plan.device_batch_size, trainer.device,
                                                  *oom_simulation_hint(config, trainer.world))) from None
        lost = lost_peer_line(exc, trainer.world.rank)
        if lost:
            raise UserError(lost) from None
        raise
    finally:
        trainer.close(failed=failed)
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
    if code == SIGTERM_EXIT_CODE:
        _leave_process_group_together(code)
    teardown_distributed(code)  # under torchrun: barrier/destroy/os._exit (avoids gloo's exit-time abort)
    sys.exit(code)


def _leave_process_group_together(code: int) -> None:
    """After a SIGTERM stop every rank saved and stopped at the same step, so they can leave the process group
    in the order that avoids gloo's exit-time abort (barrier, destroy, flush, os._exit) and keep the exit code;
    teardown_distributed does this only for successful runs."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli_main() -> None:
    cli_entry(main)


if __name__ == "__main__":
    cli_main()
