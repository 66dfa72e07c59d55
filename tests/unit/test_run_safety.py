"""Stopping and restarting runs safely: SIGTERM saves and exits 143, Ctrl-C mid-save is one line, one run per
run folder, and a checkpoint refuses a tokenizer other than its own."""

import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from tests.helpers.runs import one_line, prepared_home, run_cli, tiny_run_args, train_losses
from titanlite.checkpoint import list_steps
from titanlite.errors import UserError
from titanlite.run_lock import LOCK_FILE, RunLock

REPO = Path(__file__).resolve().parents[2]
BASE = tiny_run_args(1000)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from prepared_home(tmp_path_factory, BASE)


def _args(dump, *extra):
    return BASE + [f"--job.dump_folder={dump}", *extra]


def _losses(dump, *extra) -> dict[int, float]:
    return train_losses(_args(dump, *extra))


def _cli(capsys, dump, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, _args(dump, *extra))


def _start_training(home, dump) -> tuple[subprocess.Popen, list[str]]:
    """`python -m titanlite.train` in the background; returns the process and its stdout lines so far (a reader
    thread keeps appending)."""
    env = dict(os.environ, TITANLITE_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "titanlite.train", *_args(dump)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    proc.err_lines = []
    # one reader per pipe, and nothing else reads them: communicate() would race the stdout reader for lines
    proc.readers = [threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True),
                    threading.Thread(target=lambda: proc.err_lines.extend(proc.stderr), daemon=True)]
    for reader in proc.readers:
        reader.start()
    return proc, lines


def _finish(proc, timeout: float = 300) -> str:
    """Wait for the process and both readers; returns its stderr."""
    proc.wait(timeout=timeout)
    for reader in proc.readers:
        reader.join(timeout=30)
    return "".join(proc.err_lines)


def _wait_for_step(proc, lines, prefix: str, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in lines):
        assert proc.poll() is None, f"training ended early: {proc.returncode}\n{''.join(lines)[-3000:]}"
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.02)


def test_sigterm_saves_the_step_reached_exits_143_and_resumes_bitwise(home, tmp_path, capsys):
    proc, lines = _start_training(home, tmp_path)
    try:
        _wait_for_step(proc, lines, "step 00002/")
        # meanwhile a second run into the same folder is refused, naming the first
        code, out, err = _cli(capsys, tmp_path)
        assert code == 2
        line = one_line(out, err)
        assert line.startswith(f"error: run folder {tmp_path / 'd2'} is in use by another run (PID {proc.pid} on "
                               f"host {socket.gethostname()}")
        proc.send_signal(signal.SIGTERM)
        err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    steps = list_steps(tmp_path / "d2")
    assert len(steps) == 1 and 2 <= steps[0] < 1000
    reached = steps[0]
    assert any(line.startswith(f"step {reached:05d}/01000") for line in lines)  # the step it finished
    assert not any(line.startswith(f"step {reached + 1:05d}/") for line in lines)
    assert err.strip().splitlines() == [
        f"stopped by SIGTERM after step {reached}: checkpoint saved to {tmp_path / 'd2' / f'step-{reached:06d}'}; "
        "resume with --checkpoint.resume_from_step=latest"]
    assert not (tmp_path / "d2" / LOCK_FILE).exists()

    stop = f"--debug.stop_after_steps={reached + 3}"
    straight = _losses(tmp_path / "straight", stop)
    resumed = _losses(tmp_path, "--checkpoint.resume_from_step=latest", stop)
    assert sorted(resumed) == [reached + 1, reached + 2, reached + 3]
    for step in resumed:
        assert resumed[step] == straight[step], step  # bitwise on CPU


def test_sigint_during_a_sync_save_isone_line(home, tmp_path, capsys, monkeypatch):
    real_write = FileSystemWriter.write_data

    def write_then_interrupt(self, plan, planner):
        if ".step-000004.tmp" in str(self.path):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the checkpoint files are being written
        return real_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_then_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, out, err = _cli(capsys, tmp_path, "--checkpoint.save_every=2", "--training.num_iterations=6")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert one_line(out, err) == ("error: interrupted by the user (Ctrl-C); checkpoints already written are "
                                   "intact")
    assert list_steps(tmp_path / "d2") == [2]
    assert not (tmp_path / "d2" / ".step-000004.tmp").exists()


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(home, tmp_path, capsys):
    assert _cli(capsys, tmp_path, "--training.num_iterations=2")[0] == 0
    other = tmp_path / "other_tokenizer"
    shutil.copytree(home / "tokenizer" / "embedded-512", other)
    ranks = (other / "tokenizer.tiktoken").read_text().splitlines()
    # same vocabulary size, two merges traded places: ids 300 and 301 now stand for each other's bytes
    (a, ra), (b, rb) = ranks[300].split(), ranks[301].split()
    ranks[300], ranks[301] = f"{b} {ra}", f"{a} {rb}"
    (other / "tokenizer.tiktoken").write_text("\n".join(ranks) + "\n")
    assert base64.b64decode(a) != base64.b64decode(b)

    code, out, err = _cli(capsys, tmp_path, "--training.num_iterations=2", f"--data.tokenizer_dir={other}",
                          "--checkpoint.resume_from_step=latest")
    assert code == 2
    line = one_line(out, err)
    assert line.startswith(f"error: checkpoint {tmp_path / 'd2' / 'step-000002'} was trained with another "
                           "tokenizer")
    # the original tokenizer still resumes
    assert _cli(capsys, tmp_path, "--training.num_iterations=2", "--checkpoint.resume_from_step=latest")[0] == 0


# ----- the run-folder lock on its own ---------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(holder))


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    from titanlite.logging_utils import logger

    pid = _dead_pid()
    _write_lock(tmp_path, host=socket.gethostname(), pid=pid, started="yesterday")
    capture = _Capture()
    logger.addHandler(capture)
    try:
        lock = RunLock(tmp_path).acquire()
    finally:
        logger.removeHandler(capture)
    warnings = capture.lines
    assert warnings == [f"warning: taking over the lock of run folder {tmp_path} from PID {pid} on host "
                        f"{socket.gethostname()}, started yesterday: that process is no longer running"]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no side files left


def test_live_or_foreign_host_lock_is_respected(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "a", host=socket.gethostname(), pid=sleeper.pid, started="now")
        with pytest.raises(UserError, match=rf"in use by another run \(PID {sleeper.pid} on host "):
            RunLock(tmp_path / "a").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # on another host nothing tells whether it runs: never taken over, whatever its PID
    _write_lock(tmp_path / "b", host="some-other-host", pid=_dead_pid(), started="now")
    with pytest.raises(UserError, match=r"on host some-other-host.*delete .*run\.lock"):
        RunLock(tmp_path / "b").acquire()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    """Same host, a live PID, but a process started at another time (a container restart reuses low PIDs)."""
    from titanlite.run_lock import this_process

    me = this_process()
    if me["start_ticks"] is None:
        pytest.skip("no /proc start times on this system")
    _write_lock(tmp_path, **dict(me, start_ticks=me["start_ticks"] - 1))
    RunLock(tmp_path).acquire().release()
    # the same process holding it for real is refused (two trainers of one process into one folder)
    first = RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    first.release()
