"""Starting the sweep's runs: the trainer's command line per run, and running it as a child process.

Every run is `python -m titanlite.train` (or torchrun around it) with the sweep's base arguments plus the
run's own overrides, so a sweep run is exactly what a user would have typed. The local runner keeps one child
at a time, sends its output to the run's `train.log`, and passes a SIGTERM/Ctrl-C on to it as SIGTERM so the
trainer saves a checkpoint and the run resumes next time. If the sweep process itself is killed outright, the
child gets SIGTERM from the kernel (Linux parent-death signal) instead of training on unattended.
"""

from __future__ import annotations

import ctypes
import json
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from titanlite.errors import UserError
from titanlite.paths import read_json_object
from titanlite.run_lock import LOCK_FILE, describe_holder, holder_is_running
from titanlite.sweep.runs import FAILURE_FILE, LOG_FILE, RunRecord

LAUNCHERS = ("local", "torchrun", "print")
# The sweep sets these per run; a user value would be silently replaced, so it is refused instead.
SWEEP_KEYS = {"model.depth": "--depths", "training.target_flops": "--flops",
              "training.num_iterations": "the budget (training.target_flops)",
              "checkpoint.model_tag": "the run name", "checkpoint.resume_from_step": "the sweep (it resumes by itself)"}
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
LOCK_WAIT_S = 120.0   # a run killed with its sweep saves its checkpoint and exits within seconds


def check_user_overrides(argv: list[str]) -> None:
    for token in argv:
        if token.startswith("--"):
            key = token[2:].partition("=")[0].replace("-", "_")
            if key in SWEEP_KEYS:
                raise UserError(f"--{key} is set by the sweep for every run ({SWEEP_KEYS[key]}); remove it from "
                                f"the command line")


def run_overrides(sweep_dir: Path, run: RunRecord, resume: bool) -> list[str]:
    overrides = [f"--job.dump_folder={sweep_dir}", f"--checkpoint.model_tag={run.name}",
                 f"--model.depth={run.depth}", f"--training.target_flops={run.budget!r}",
                 "--training.num_iterations=-1", "--training.target_param_data_ratio=-1"]
    if resume:
        overrides.append("--checkpoint.resume_from_step=latest")
    return overrides


def train_command(launcher: str, nproc: int, args: list[str], python: str = sys.executable) -> list[str]:
    if launcher == "torchrun" or (launcher == "print" and nproc > 1):
        runner = [python, "-m", "torch.distributed.run"] if python != "python" else ["torchrun"]
        return [*runner, "--standalone", f"--nproc-per-node={nproc}", "-m", "titanlite.train", *args]
    return [python, "-m", "titanlite.train", *args]


def format_command(command: list[str]) -> str:
    return shlex.join(command)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the sweep dies (prctl PR_SET_PDEATHSIG, Linux only)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def live_holder(folder: Path) -> dict | None:
    """Who holds the run folder's lock, unless nobody does or the holder is known dead (the trainer takes such a
    lock over)."""
    holder = read_json_object(folder / LOCK_FILE)
    if holder is None or holder_is_running(holder) is False:
        return None
    return holder


def held_by_another(folder: Path, child_pid: int) -> str | None:
    """After a failed run: a line naming the live process that holds the folder if it is not our child (another
    sweep started the same run a moment earlier), else None. Such a run is skipped, not failed."""
    holder = live_holder(folder)
    if holder is None or holder.get("pid") == child_pid:
        return None
    return f"run folder in use by {describe_holder(holder)}"


def wait_for_lock(folder: Path, say) -> str | None:
    """None once no live process holds the run folder; else a line naming the holder (after LOCK_WAIT_S)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    told = False
    while True:
        holder = live_holder(folder)
        if holder is None:
            return None
        if time.monotonic() > deadline:
            return f"run folder in use by {describe_holder(holder)}"
        if not told:
            say(f"  waiting for {describe_holder(holder)} to release {folder} (a run of an earlier sweep saving "
                f"its checkpoint?)")
            told = True
        time.sleep(0.5)


@dataclass
class Outcome:
    exit_code: int
    error: str          # one line, "" on success
    interrupted: bool   # the sweep was asked to stop: not a failure of the run
    seconds: float
    pid: int = 0        # the child's process id


def last_error_line(log: Path, start: int) -> str:
    """The run's own one-line error (`error: ...`), else the last line it printed (a traceback's last line)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(start)
            lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1] if lines else "")


class LocalRunner:
    """Runs one child at a time; SIGTERM/SIGINT to the sweep become a SIGTERM to the child and a stop."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None

    def __enter__(self) -> "LocalRunner":
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = self.stop_signal or signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)  # the trainer saves at the next step boundary and exits 143

    def run(self, command: list[str], folder: Path) -> Outcome:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / LOG_FILE
        start = time.perf_counter()
        with open(log, "ab") as fh:
            offset = fh.tell()
            fh.write(f"=== sweep: {time.strftime('%Y-%m-%d %H:%M:%S')}: {format_command(command)}\n".encode())
            fh.flush()
            (folder / FAILURE_FILE).unlink(missing_ok=True)  # a retry: the previous failure no longer stands
            # a session of its own: a terminal's Ctrl-C reaches the sweep only, which passes it on once
            self.child = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            pid, code = self.child.pid, self.child.wait()
            self.child = None
        seconds = time.perf_counter() - start
        if code == 0:
            return Outcome(0, "", False, seconds, pid)
        error = last_error_line(log, offset)
        if code < 0:
            error = f"killed by signal {-code}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        # 143: the trainer was stopped by SIGTERM and saved a checkpoint, so the run resumes rather than fails
        interrupted = self.stop_signal is not None or code == SIGTERM_EXIT_CODE
        return Outcome(code, error or f"exit code {code}", interrupted, seconds, pid)


def record_failure(folder: Path, outcome: Outcome, command: list[str]) -> None:
    (folder / FAILURE_FILE).write_text(json.dumps(
        {"error": outcome.error, "exit_code": outcome.exit_code, "command": format_command(command),
         "log": str(folder / LOG_FILE), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))


def check_launcher(launcher: str, nproc: int) -> None:
    if launcher not in LAUNCHERS:
        raise UserError(f"--launch {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if nproc < 1:
        raise UserError(f"--nproc-per-node {nproc} must be >= 1")
    if launcher == "local" and nproc > 1:
        raise UserError(f"--nproc-per-node {nproc} needs --launch torchrun (or print)")

