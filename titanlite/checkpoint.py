"""Distributed Checkpoint (DCP) save/resume with atomic step folders, retention and optional async saves.

Layout: `<folder>/step-000123/` holds DCP's files (`.metadata` + one data file per rank) and `meta.json`
(step, model args, the resolved config TOML). A save is written to `<folder>/.step-000123.tmp/` and renamed
by rank 0 only after every rank has finished writing, so a crash mid-save never leaves a folder that looks
complete and never touches an earlier checkpoint. A save that fails (disk full, read-only or foreign folder)
removes its temporary folder and raises one UserError line naming the path and the cause, on every rank.
DCP reshards on load: a checkpoint written by N ranks loads on M ranks (or in a plain process without a
process group).

What is saved is whatever the trainer passes: nn.Modules (through get/set_model_state_dict, which handle FSDP2
DTensors and strip compile's `_orig_mod.`), Stateful objects (optimizers, train state) and plain dicts whose
entries may differ per rank (each rank's data-loader streams under their own keys).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import torch.nn as nn
from torch.distributed.checkpoint._traverse import set_element  # private, but what DCP's own planner uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from titanlite.cli import is_interrupt
from titanlite.distributed import WorldInfo
from titanlite.errors import UserError
from titanlite.fs_errors import failed_path, write_failure_cause
from titanlite.logging_utils import logger

STEP_DIR = re.compile(r"^step-(\d{6,})$")
META_FILE = "meta.json"
DCP_METADATA_FILE = ".metadata"
FORMAT_VERSION = 1
# Model-args fields that change parameter shapes or meaning: a checkpoint differing in these cannot be loaded.
ARCHITECTURE_FIELDS = ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "vocab_size")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def tmp_dir_name(step: int) -> str:
    return f".{step_dir_name(step)}.tmp"


# Async saves warn from DCP's background thread, which a catch_warnings block does not cover.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@contextlib.contextmanager
def quiet_single_process():
    """A single process without a process group is a normal titanlite run, not worth DCP's warning per save."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class ModelState(Stateful):
    """An nn.Module as DCP sees it: FQN-keyed (unsharded names), DTensor shards under FSDP2."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, but non-tensor entries are unpickled with weights_only=True (no arbitrary code)."""

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def describe_failure(exc: BaseException) -> str:
    """One line for a DCP failure: the first rank's underlying exception (not DCP's multi-rank traceback)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _trace) = next(iter(sorted(exc.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {describe_failure(inner)}"
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{exc.__class__.__name__}: {first[:300]}" if first else exc.__class__.__name__


def agree_on_error(message: Any) -> Any:
    """The first rank's error (None when no rank has one), on every rank: a step only one rank performs
    (rank 0 writes meta.json and renames) must fail on all of them, or the others wait forever at a barrier."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return message
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m is not None), None)


def raise_agreed(error: str | None) -> None:
    """Raise the first rank's error as one UserError line on every rank (a barrier when there is none)."""
    error = agree_on_error(error)
    if error is not None:
        raise UserError(error)


def remove_interrupted_saves(folder: Path) -> None:
    """Clear what saves that never completed left behind; only for the run that owns the folder (another process
    may be mid-save). A `.step-*.tmp` is never a complete checkpoint, and after a disk-full failure it is what
    keeps the disk full. A `.step-*.replaced` is the previous copy of a step being re-saved: it is put back when
    the process died between the two renames, so that step is not lost."""
    if not folder.is_dir():
        return
    for stale in folder.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for replaced in folder.glob(".step-*.replaced"):
        final_dir = folder / replaced.name[1:-len(".replaced")]
        if final_dir.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(replaced, final_dir)


def _model_args(states: dict[str, Any]):
    """The first module's `args` dataclass (None when no module in `states` has one)."""
    for value in states.values():
        if isinstance(value, nn.Module):
            args = getattr(value, "args", None)
            if dataclasses.is_dataclass(args):
                return args
    return None


def model_args_dict(states: dict[str, Any]) -> dict | None:
    args = _model_args(states)
    return dataclasses.asdict(args) if args is not None else None


def _as_dcp_states(states: dict[str, Any]) -> dict[str, Any]:
    return {key: ModelState(value) if isinstance(value, nn.Module) else value for key, value in states.items()}


def list_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint (renamed folder with DCP metadata and meta.json), ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / DCP_METADATA_FILE).is_file() and (entry / META_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def read_meta(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {step_dir} has no readable {META_FILE} ({exc.__class__.__name__}): it is "
                        "incomplete or corrupt; resume from another step (e.g. --checkpoint.resume_from_step=latest)"
                        ) from None


def check_model_args(saved: dict | None, current: dict | None, where: Path) -> None:
    """Refuse a checkpoint of another architecture with one line naming both configurations."""
    if not saved or not current:
        return
    differing = [f for f in ARCHITECTURE_FIELDS if f in saved and f in current and saved[f] != current[f]]
    if differing:
        ckpt = ", ".join(f"{f}={saved[f]}" for f in differing)
        model = ", ".join(f"{f}={current[f]}" for f in differing)
        raise UserError(f"checkpoint {where} was saved from a different model ({ckpt}) than the one configured "
                        f"now ({model}); use the config the checkpoint was trained with (model.depth, "
                        "data.vocab_size, ...) or point checkpoint.model_tag at another run")
    for field in ("sequence_len", "window_pattern", "softcap"):
        if field in saved and field in current and saved[field] != current[field]:
            logger.warning(f"checkpoint {where} was trained with {field}={saved[field]!r}; continuing with "
                           f"{field}={current[field]!r}")


class CheckpointManager:
    def __init__(self, checkpoint_cfg, folder: Path, world: WorldInfo, *, config_toml: str | None = None,
                 tokenizer_fingerprint: str | None = None):
        """`folder` is the run folder (`<dump_folder>/<model_tag or d<depth>>`); steps go directly inside.

        config_toml: the resolved config written into each meta.json (default: the run folder's config.toml
        if the trainer wrote one). tokenizer_fingerprint: stored in each meta.json; a checkpoint with another
        one is refused on load (its token ids would mean other text). Checkpoints without one load unchecked.
        """
        self.cfg = checkpoint_cfg
        self.folder = Path(folder)
        self.world = world
        self.config_toml = config_toml
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.is_main = world.rank == 0
        self.async_enabled = checkpoint_cfg.async_mode == "async"
        if checkpoint_cfg.async_mode not in ("disabled", "async"):
            raise UserError(f"checkpoint.async_mode = {checkpoint_cfg.async_mode!r} is not supported; use "
                            "disabled or async")
        if checkpoint_cfg.keep_latest_k < 0:
            raise UserError(f"checkpoint.keep_latest_k = {checkpoint_cfg.keep_latest_k} must be >= 0 (0 keeps all)")
        # Async saves run DCP's collectives from a background thread: give them their own gloo group so they
        # never interleave with the training collectives on the default group (torchtitan does the same).
        self._async_group = None
        if self.async_enabled and self._distributed:
            self._async_group = dist.new_group(backend="gloo")
        self._pending: tuple[Any, int, dict] | None = None  # (future, step, meta) of an async save

    @property
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier()

    # ----- queries -----------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        steps = list_steps(self.folder)
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.folder / step_dir_name(step)

    # ----- save --------------------------------------------------------------------------------------------
    def _meta(self, step: int, states: dict[str, Any]) -> dict:
        config_toml = self.config_toml
        if config_toml is None:
            config_file = self.folder / "config.toml"
            config_toml = config_file.read_text() if config_file.is_file() else ""
        args = _model_args(states)
        return {"format_version": FORMAT_VERSION, "step": step, "model_args": model_args_dict(states),
                "model_args_class": type(args).__name__ if args is not None else None,
                "world_size": self.world.world_size, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "config_toml": config_toml}

    def save(self, step: int, states: dict[str, Any], *, final: bool = False) -> bool:
        """Write `states` as step `step` (collective: every rank calls it with its own states).

        Returns True when the checkpoint is complete and published on return. Async mode returns False once
        the state is staged in host memory; the folder becomes visible (renamed, "checkpoint saved" printed)
        at `wait()`, which the next save, `close()` or the trainer's poll calls. The final save is always
        synchronous. A failure removes the partial `.tmp` folder and raises one UserError line naming the path
        and the cause; Ctrl-C during the write is a plain KeyboardInterrupt.
        """
        self.wait()
        tmp = self.folder / tmp_dir_name(step)
        error = None
        if self.is_main:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                remove_interrupted_saves(self.folder)
            except OSError as exc:
                error = self._failure_line(step, failed_path(exc, self.folder), write_failure_cause(exc, tmp)
                                           or describe_failure(exc), removed=None)
        raise_agreed(error)  # doubles as the barrier: nobody writes before the stale folders are gone
        meta = self._meta(step, states)
        dcp_states = _as_dcp_states(states)
        try:
            with quiet_single_process():
                if self.async_enabled and not final:
                    future = dcp.async_save(dcp_states, checkpoint_id=str(tmp), process_group=self._async_group,
                                            no_dist=not self._distributed)
                    self._pending = (future, step, meta)
                    return False
                dcp.save(dcp_states, checkpoint_id=str(tmp), no_dist=not self._distributed)
        except (Exception, CheckpointException, KeyboardInterrupt) as exc:  # CheckpointException: a BaseException
            # DCP gathers every rank's write result before raising, so all ranks fail here together and
            # nobody still writes into `tmp` when rank 0 removes it.
            if is_interrupt(exc):
                self._remove_tmp(step)
                raise KeyboardInterrupt from None
            raise UserError(self._abandon(step, exc)) from None
        self._finalize(step, meta)
        return True

    def pending_done(self) -> bool | None:
        """None without an async save in flight; else whether this rank's part of it has finished."""
        return None if self._pending is None else self._pending[0].done()

    def wait(self) -> None:
        """Finish an in-flight async save (every rank), then publish it; a failure is one UserError line."""
        if self._pending is None:
            return
        future, step, meta = self._pending
        self._pending = None
        error = None
        try:
            future.result()
        except BaseException as exc:  # noqa: BLE001 - the background write's failure, whatever its type
            error = self._failure_parts(step, exc)
        error = agree_on_error(error)  # one rank's failed write fails the checkpoint on all of them
        if error is not None:
            removed = self._remove_tmp(step)
            raise UserError(self._failure_line(step, *error, removed=removed))
        self._finalize(step, meta)

    def abandon_pending(self) -> None:
        """After a failure elsewhere (the ranks may no longer meet): let this rank's async write finish, publish
        nothing. The `.tmp` folder is cleared by the next run."""
        if self._pending is not None:
            future, self._pending = self._pending[0], None
            with contextlib.suppress(BaseException):
                future.result()

    # ----- failures ----------------------------------------------------------------------------------------
    def _failure_parts(self, step: int, exc: BaseException) -> tuple[str, str]:
        """(path, cause) of a failed save; call it before the partial files are removed (they are what filled
        the disk, which the cause may be read from)."""
        tmp = self.folder / tmp_dir_name(step)
        return failed_path(exc, tmp), write_failure_cause(exc, tmp) or describe_failure(exc)

    def _abandon(self, step: int, exc: BaseException) -> str:
        where, cause = self._failure_parts(step, exc)
        return self._failure_line(step, where, cause, removed=self._remove_tmp(step))

    def _remove_tmp(self, step: int) -> bool:
        tmp = self.folder / tmp_dir_name(step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            return not tmp.exists()
        return True

    def _failure_line(self, step: int, where: str, cause: str, removed: bool | None) -> str:
        """removed: whether the partial save is gone (None: nothing was written yet)."""
        latest = self.latest_step()
        kept = (f"the last complete checkpoint, {self.step_dir(latest)}, is intact" if latest is not None
                else "no earlier checkpoint exists")
        partial = ("nothing was written and " if removed is None else "the partial save was removed and " if removed
                   else f"the partial save {self.folder / tmp_dir_name(step)} is removed by the next run and ")
        fix = {"no space left on device": "free space on that disk",
               "disk quota exceeded": "free space or raise the quota"}.get(
            cause, "make the folder writable (or point job.dump_folder at another one)"
            if cause in ("read-only file system", "permission denied", "operation not permitted")
            else "fix the cause")
        return (f"could not save checkpoint step {step}: {where}: {cause}; {partial}{kept}. {fix[0].upper()}"
                f"{fix[1:]}, then resume with --checkpoint.resume_from_step=latest")

    def _finalize(self, step: int, meta: dict) -> None:
        # Everyone has written their files once all ranks pass this barrier; only then is the rename safe.
        self._barrier()
        error = None
        if self.is_main:
            tmp, final_dir = self.folder / tmp_dir_name(step), self.step_dir(step)
            replaced = self.folder / f".{step_dir_name(step)}.replaced"
            try:
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
                if final_dir.exists():  # re-saving a step: move the old one aside first, so rename can succeed
                    shutil.rmtree(replaced, ignore_errors=True)
                    os.rename(final_dir, replaced)
                    os.rename(tmp, final_dir)
                    shutil.rmtree(replaced, ignore_errors=True)
                else:
                    os.rename(tmp, final_dir)
            except OSError as exc:
                if replaced.exists() and not final_dir.exists():
                    with contextlib.suppress(OSError):
                        os.rename(replaced, final_dir)  # the earlier copy of this step stays published
                error = self._abandon(step, exc)
            else:
                self._apply_retention(keep=step)
        raise_agreed(error)  # also: nobody looks for the checkpoint before it exists under its final name
        logger.info(f"step {step:05d} | checkpoint saved to {self.step_dir(step)}")

    def _apply_retention(self, keep: int) -> None:
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        steps = list_steps(self.folder)
        for old in steps[:-k]:
            if old != keep:
                shutil.rmtree(self.step_dir(old), ignore_errors=True)
                logger.info(f"checkpoint retention: removed {self.step_dir(old)} (keep_latest_k={k})")

    # ----- load --------------------------------------------------------------------------------------------
    def resolve_step(self, step: int | str) -> int:
        if step == "latest":
            latest = self.latest_step()
            if latest is None:
                raise UserError(f"checkpoint.resume_from_step = latest but {self.folder} holds no complete "
                                "checkpoint; start without --checkpoint.resume_from_step, or point "
                                "job.dump_folder / checkpoint.model_tag at the run to resume")
            return latest
        step = int(step)
        step_dir = self.step_dir(step)
        if not step_dir.is_dir():
            available = list_steps(self.folder)
            hint = (f"available steps: {', '.join(str(s) for s in available)}" if available
                    else "there are no complete checkpoints there")
            raise UserError(f"checkpoint step {step} not found: {step_dir} does not exist; {hint}")
        if not (step_dir / DCP_METADATA_FILE).is_file():
            raise UserError(f"checkpoint {step_dir} has no DCP {DCP_METADATA_FILE} file: it is incomplete or "
                            "corrupt; resume from another step")
        return step

    def load(self, step: int | str, states: dict[str, Any]) -> int:
        """Load step `step` ("latest" for the newest) into `states` in place; returns the step loaded.

        Plain dict entries are filled in place (dict values replaced by the saved ones); modules and Stateful
        objects get load_state_dict. Works on any world size, with or without a process group.
        """
        self.wait()
        step = self.resolve_step(step)
        step_dir = self.step_dir(step)
        meta = read_meta(step_dir)
        check_model_args(meta.get("model_args"), model_args_dict(states), step_dir)
        saved_tokenizer = meta.get("tokenizer_fingerprint")
        if saved_tokenizer and self.tokenizer_fingerprint and saved_tokenizer != self.tokenizer_fingerprint:
            raise UserError(f"checkpoint {step_dir} was trained with another tokenizer (fingerprint "
                            f"{saved_tokenizer[:12]}, the configured one is {self.tokenizer_fingerprint[:12]}): its "
                            "token ids would mean other text; resume with the tokenizer it was trained with "
                            "(data.tokenizer_dir, data.dataset, data.vocab_size) or start a new run (another "
                            "checkpoint.model_tag)")
        try:
            with quiet_single_process():
                dcp.load(_as_dcp_states(states), checkpoint_id=str(step_dir), planner=WeightsOnlyLoadPlanner(),
                         no_dist=not self._distributed)
        except UserError:
            raise
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP reports storage problems many ways
            raise UserError(f"could not load checkpoint {step_dir}: {describe_failure(exc)} — it is corrupt, "
                            "incomplete, or from another run layout; resume from another step") from exc
        return step

    def close(self) -> None:
        self.wait()


# ----- finding a step folder (export, evaluation) ---------------------------------------------------------------

def find_step_dir(path: Path, step: int | str = "latest") -> Path:
    """`path` is a step folder itself, or a run folder from which `step` (a number or "latest") is picked."""
    path = Path(path)
    if STEP_DIR.match(path.name) and path.is_dir():
        return path
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass a run folder (outputs/<model_tag>) or one of its step-* folders")
    steps = list_steps(path)
    if step == "latest":
        if not steps:
            raise UserError(f"{path} holds no complete checkpoint (no step-*/ folder with .metadata and meta.json)")
        return path / step_dir_name(steps[-1])
    if int(step) not in steps:
        raise UserError(f"checkpoint step {step} not found in {path}; available steps: "
                        f"{', '.join(map(str, steps)) or 'none'}")
    return path / step_dir_name(int(step))
