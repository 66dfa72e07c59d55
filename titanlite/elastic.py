"""Coming back from a fault without a person: which checkpoint a (re)started run resumes, what a changed world
size does to the batch, and what a save and a restart cost.

torchrun restarts its workers with the command line they were first given (`--max-restarts`, and on every change
of membership under `--nnodes=MIN:MAX`) and tells them so in TORCHELASTIC_RESTART_COUNT. A restarted worker must
continue the run, not begin it again, so it resumes the latest complete checkpoint whatever
checkpoint.resume_from_step says; `auto` asks the same of a first start (a scheduler's requeue starts the job
afresh, with a count of 0).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from titanlite.agent_store import attempt_number
from titanlite.checkpoint import read_meta
from titanlite.errors import UserError

RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
# Assumed storage rates for the plan's cost lines (a local NVMe or a parallel file system does better, a network
# home directory worse): the lines say which rate they assume.
ASSUMED_WRITE_BYTES_PER_S = 1e9
ASSUMED_READ_BYTES_PER_S = 2e9


def restart_count() -> int:
    """How many times torchrun has restarted this worker's group: its own count (0 outside torchrun and on the
    first attempt), or the attempts the job's shared store has seen, which also counts the restarts torchrun makes
    when a node joins (TORCHELASTIC_RESTART_COUNT does not, and is kept per agent)."""
    value = os.environ.get(RESTART_COUNT_ENV, "")
    try:
        count = max(0, int(value)) if value else 0
    except ValueError:
        raise UserError(f"environment variable {RESTART_COUNT_ENV}={value!r} is not an integer; it is set by "
                        "torchrun, launch with torchrun or unset it") from None
    return max(count, (attempt_number() or 1) - 1)


@dataclass(frozen=True)
class ResumeChoice:
    step: int | str | None  # None: start fresh; "latest" or a step number: what CheckpointManager.resolve_step takes
    line: str | None        # what to tell the user (None: an ordinary first start or an explicit resume)


def choose_resume(requested: str, latest: int | None, folder: Path, restarts: int) -> ResumeChoice:
    """What a start resumes, from checkpoint.resume_from_step, the latest complete step in the run folder and
    torchrun's restart count."""
    requested = str(requested).strip().lower()
    if restarts > 0:
        ignored = "" if requested in ("auto", "latest", "-1", "") else \
            f"; checkpoint.resume_from_step = {requested} applies to the first start only"
        if latest is None:
            return ResumeChoice(None, f"torchrun restart {restarts}: no complete checkpoint in {folder} yet, "
                                      f"starting fresh{ignored}")
        return ResumeChoice(latest, f"torchrun restart {restarts}: resuming the latest complete checkpoint, "
                                    f"{folder}/step-{latest:06d}{ignored}")
    if requested == "auto":
        if latest is None:
            return ResumeChoice(None, f"checkpoint.resume_from_step = auto: no complete checkpoint in {folder}, "
                                      "starting fresh")
        return ResumeChoice(latest, f"checkpoint.resume_from_step = auto: resuming the latest complete "
                                    f"checkpoint, {folder}/step-{latest:06d}")
    if requested in ("-1", ""):
        return ResumeChoice(None, None)
    return ResumeChoice("latest" if requested == "latest" else int(requested), None)


def agreed_resume_inputs(checkpointer) -> tuple[int | None, int]:
    """(latest complete step as rank 0 sees it, the highest restart count of any rank), the same on every rank:
    the ranks must load the same step, and a rank listing the folder while rank 0 publishes a save (or on a file
    system that shows it later) could see another one; a restart seen by one rank is a restart for all."""
    mine = (checkpointer.latest_step() if checkpointer.is_main else None, restart_count())
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered[0][0], max(restarts for _, restarts in gathered)


def _saved_device_batch_size(meta: dict) -> int | None:
    try:
        return int(tomllib.loads(meta.get("config_toml") or "")["training"]["device_batch_size"])
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError):
        return None


def world_change_line(step_dir: Path, step: int, plan) -> str | None:
    """One line when the checkpoint was written by another number of processes than this run has (None when the
    same): old and new world size, the step resumed, and how the unchanged global batch is now split."""
    meta = read_meta(step_dir)
    old_world = meta.get("world_size")
    if not isinstance(old_world, int) or old_world == plan.world_size:
        return None
    old_dbs = _saved_device_batch_size(meta)
    old_split = old_dbs * plan.seq_len * old_world if old_dbs else 0
    accum = (f"grad accumulation {plan.total_batch_size // old_split} → {plan.grad_accum_steps} micro-steps"
             if old_split and plan.total_batch_size % old_split == 0
             else f"grad accumulation {plan.grad_accum_steps} micro-steps")
    return (f"world size {old_world} → {plan.world_size}: resumed from step {step} ({step_dir}); the global batch "
            f"stays {plan.total_batch_size:,} tokens per step, {accum}")


# Signs of a collective whose peer process is gone (gloo's TCP pairs, NCCL's abort after a peer's failure).
PEER_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                   "NCCL communicator was aborted", "remote process exited or there was a network error")


def lost_peer_line(exc: BaseException, rank: int) -> str | None:
    """One line for a collective that failed because another process of the job died (None for anything else):
    the surviving ranks say what happened instead of a traceback from deep inside FSDP."""
    text = str(exc)
    sign = next((s for s in PEER_LOST_SIGNS if s in text), None)
    if not isinstance(exc, RuntimeError) or sign is None:
        return None
    return (f"rank {rank} lost another process of this job mid-collective ({sign}): it died or its node is "
            "gone; under torchrun with --max-restarts the workers restart and resume the latest complete "
            "checkpoint, otherwise resume with --checkpoint.resume_from_step=auto")


# ----- what faults cost (lines for the plan block) ------------------------------------------------------------

def checkpoint_bytes(plan, spec) -> tuple[int, int] | None:
    """(fp32 weights, optimizer state) bytes of one checkpoint, from the family's memory estimate counted on one
    unsharded device; None when the family has no estimate."""
    if getattr(spec, "estimate_memory", None) is None:
        return None
    est = spec.estimate_memory(plan, 4, 1, "none", 1, compiled=False)
    return est.parameters, est.optimizer_states


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 0.01:
        return "< 0.01 s"
    return f"{seconds:.2g} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def format_fault_costs(plan, spec, checkpoint_cfg) -> str:
    """Two plan lines: what one save writes (and how long that takes at an assumed rate), and what a restart
    costs: reading it back, plus the work since the last save, which is done again."""
    sizes = checkpoint_bytes(plan, spec)
    if not checkpoint_cfg.enabled:
        return "  fault cost        : checkpoints off (checkpoint.enabled = false): a fault loses the whole run"
    if sizes is None:
        save = "size not estimated for this model family"
        read = "reading the checkpoint"
    else:
        total = sum(sizes)
        blocking = ("async: training waits only for the copy to host memory"
                    if checkpoint_cfg.async_mode == "async" else "training waits for it")
        save = (f"{_size(total)} per save (weights {_size(sizes[0])} + optimizer state {_size(sizes[1])}, fp32), "
                f"{_duration(total / ASSUMED_WRITE_BYTES_PER_S)} at {_size(ASSUMED_WRITE_BYTES_PER_S)}/s "
                f"({blocking})")
        read = f"{_duration(total / ASSUMED_READ_BYTES_PER_S)} reading it at {_size(ASSUMED_READ_BYTES_PER_S)}/s"
    bounds = []
    if checkpoint_cfg.save_every > 0:
        bounds.append(f"{checkpoint_cfg.save_every} steps (checkpoint.save_every)")
    minutes = getattr(checkpoint_cfg, "save_every_minutes", -1)
    if minutes > 0:
        bounds.append(f"{minutes:g} min (checkpoint.save_every_minutes)")
    redo = (f"the work since the last save is done again: at most {' or '.join(bounds)}, half that on average"
            if bounds else f"no periodic saves: a fault redoes the run from step 0 (up to {plan.num_iterations:,} "
                           "steps); set checkpoint.save_every or checkpoint.save_every_minutes")
    return "\n".join([f"  checkpoint cost   : {save}",
                      f"  restart cost      : start-up + {read}; {redo}"])
