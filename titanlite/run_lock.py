"""One run per run folder: a lock file naming its holder (host, PID); a dead holder's lock is taken over.

Two runs writing one folder would interleave checkpoints, overwrite each other's config.toml and TensorBoard
files, and remove each other's partial saves. The lock is a small JSON file created with O_EXCL (atomic, also
on NFS v3+). Whether its holder still runs can only be told on the same host: there a holder is alive when a
process with its PID exists and started at the recorded time, so a PID reused after a container restart or a
reboot does not keep a dead run's lock. A lock held on another host is respected, with one exception: a worker
of an earlier attempt of the same torchrun job (same TORCHELASTIC_RUN_ID, other than torchrun's default "none").
torchrun starts an attempt's workers only after the previous attempt's workers have stopped or their node is gone,
so that holder can no longer write, and waiting for it would block the restart forever. (On the holder's own
host the process itself is checked, as for any lock.)
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from titanlite.errors import UserError
from titanlite.fs_errors import reported_fs_errors
from titanlite.logging_utils import logger
from titanlite.paths import read_json_object

LOCK_FILE = "run.lock"
_ATTEMPTS = 5


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces: count fields after the last ")"
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of proc_pid_stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def torchrun_job() -> str | None:
    """The torchrun job this process is a worker of (its rendezvous id), None outside torchrun or when the id is
    torchrun's default, which unrelated jobs share."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return run_id if run_id and run_id != "none" else None


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
            "start_ticks": _start_ticks(os.getpid()), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torchrun_job": torchrun_job()}


def earlier_attempt_of_this_job(holder: dict) -> bool:
    """Whether `holder` is a worker of an earlier attempt of the torchrun job this process belongs to."""
    job = torchrun_job()
    mine = (socket.gethostname(), os.getpid())
    return job is not None and holder.get("torchrun_job") == job and (holder.get("host"), holder.get("pid")) != mine


def holder_is_running(holder: dict) -> bool | None:
    """True/False on the holder's own host; None on another host (nothing here can tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False  # the machine rebooted since: every process of that boot is gone
    recorded, current = holder.get("start_ticks"), _start_ticks(pid)
    if recorded is not None and current is not None:
        return recorded == current
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe_holder(holder: dict) -> str:
    return f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started', '?')}"


class RunLock:
    """`RunLock(folder).acquire()` ... `release()`; release also runs at interpreter exit."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._mine: dict | None = None

    def acquire(self) -> "RunLock":
        advice = "point job.dump_folder at a writable folder with free space"
        with reported_fs_errors("create the run folder", self.folder, advice):
            self.folder.mkdir(parents=True, exist_ok=True)
        with reported_fs_errors("write the run folder lock", self.path, advice):
            for _ in range(_ATTEMPTS):
                if self._try_create():
                    atexit.register(self.release)
                    return self
                holder = self._wait_for_content()
                if holder is None:
                    continue  # removed meanwhile: try again
                running = holder_is_running(holder)
                if running is False:
                    self._take_over(holder, "that process is no longer running")
                    continue
                if running is None and earlier_attempt_of_this_job(holder):
                    self._take_over(holder, f"it belongs to an earlier attempt of this torchrun job "
                                            f"({holder['torchrun_job']}), which torchrun has stopped")
                    continue
                raise UserError(f"run folder {self.folder} is in use by another run ({describe_holder(holder)}); "
                                f"wait for it to end or pick another folder (--checkpoint.model_tag, "
                                f"--job.dump_folder); if that run is gone, delete {self.path}")
        raise UserError(f"could not lock run folder {self.folder}: {self.path} keeps changing hands; another run "
                        f"is starting there")

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        mine = this_process()
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self._mine = mine
        return True

    def _wait_for_content(self) -> dict | None:
        """The holder record; a lock file just created may still be empty for a moment."""
        for _ in range(20):
            holder = read_json_object(self.path)
            if holder is not None or not self.path.exists():
                return holder
            time.sleep(0.05)
        raise UserError(f"{self.path} exists but names no run (not a titanlite lock, or damaged); delete it if "
                        f"no run uses {self.folder}")

    def _take_over(self, stale: dict, why: str) -> None:
        # Move the stale file aside under a name of our own: of two runs taking over at once only one rename
        # succeeds. If the file moved was not the stale one (taken over meanwhile), put it back.
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_json_object(aside)
        if moved != stale:
            os.rename(aside, self.path)
            return
        aside.unlink(missing_ok=True)
        logger.warning(f"warning: taking over the lock of run folder {self.folder} from {describe_holder(stale)}: "
                       f"{why}")

    def release(self) -> None:
        """Remove the lock if it is still ours (never one another run took over)."""
        if self._mine is None:
            return
        mine, self._mine = self._mine, None
        atexit.unregister(self.release)
        if read_json_object(self.path) == mine:
            try:
                self.path.unlink()
            except OSError:
                pass  # a read-only folder by now: the next run finds this process gone and takes over
