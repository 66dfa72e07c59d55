"""Launching real torchrun agents on localhost for tests, watching their output and killing them like a fault."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"^step (\d{5})/\d{5} \(.*?\) \| loss: (\d+\.\d+) ", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    """This process's environment for an agent: one thread, unbuffered output, no leftover rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    return env


def launch(torchrun_args: list[str], train_args: list[str], log: Path) -> subprocess.Popen:
    """`torchrun <torchrun_args> -m titanlite.train <train_args>` in its own session, stdout+stderr into `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "titanlite.train", *train_args]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=torchrun_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def wait_for(text: str, logs: list[Path], procs: list[subprocess.Popen], timeout: float) -> None:
    """Until `text` appears in one of the logs; fails if every agent exited first or on timeout."""
    deadline = time.monotonic() + timeout
    while not any(text in read(log) for log in logs):
        if all(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never appeared:\n" + "\n".join(read(log)[-3000:] for log in logs))
        time.sleep(0.01)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts its workers in sessions of their own, so a process group
    kill of the agent would leave them running)."""
    tree = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return tree
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            tree += process_tree(int(child))
    return tree


def kill_tree(pid: int) -> None:
    """kill -9 an agent and every worker it started: a node lost."""
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker_pid(agent_pid: int, rank: int) -> int:
    """The PID of the agent's worker with RANK=`rank` (read from the descendants' environments)."""
    for member in process_tree(agent_pid)[1:]:
        try:
            environ = Path(f"/proc/{member}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return member
    raise AssertionError(f"no worker with RANK={rank} under torchrun {agent_pid}")


def step_losses(text: str) -> dict[int, float]:
    """{step: printed loss} of every step line in `text` (a later line for the same step wins)."""
    return {int(step): float(loss) for step, loss in STEP_LINE.findall(text)}


def stop(procs: list[subprocess.Popen]) -> None:
    """Whatever is still running at the end of a test: killed with all its workers."""
    for p in procs:
        if p.poll() is None:
            kill_tree(p.pid)
            p.wait(timeout=30)
