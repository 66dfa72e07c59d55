"""Filesystem failures during a run are one line naming the path and the cause, and damage nothing complete.

Tests run as root, where chmod does not stop writes, so the OSError a full or read-only disk raises is injected
where the bytes leave Python: DCP's FileSystem.create_stream (every checkpoint file), TensorBoard's gfile append,
Path.write_text / Path.mkdir for the trainer's own files.
"""

import contextlib
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
from torch.distributed.checkpoint.filesystem import FileSystem

from tests.helpers.runs import one_line, prepared_home, run_cli, train_losses
from titanlite.checkpoint import list_steps

BASE = [
    "--model.depth=2", "--model.aspect_ratio=32", "--model.head_dim=32", "--model.max_seq_len=64",
    "--model.window_pattern=SL", "--training.device_type=cpu", "--training.dtype=float32",
    "--training.device_batch_size=2", "--training.total_batch_size=256", "--training.num_iterations=6",
    "--data.vocab_size=512", "--eval.eval_every=-1", "--eval.sample_every=-1", "--eval.core_metric_every=-1",
    "--metrics.log_every=1", "--metrics.tensorboard=false", "--compile.enabled=false", "--metrics.peak_flops=1e12",
    "--lr_scheduler.warmup_steps=2", "--checkpoint.save_every=2",
]
CAUSES = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
          errno.EACCES: "permission denied"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    yield from prepared_home(tmp_path_factory, BASE)


def _args(dump, *extra):
    return BASE + [f"--job.dump_folder={dump}", *extra]


def _losses(dump, *extra) -> dict[int, float]:
    return train_losses(_args(dump, *extra))


@pytest.fixture(scope="module")
def straight(home, tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("straight"))


def _cli(capsys, dump, *extra) -> tuple[int, str, str]:
    return run_cli(capsys, _args(dump, *extra))


def _one_error_line(out: str, err: str) -> str:
    line = one_line(out, err)
    assert line.startswith("error: "), err
    return line


class _FailingStream(io.RawIOBase):
    """A file whose write fails once `budget` bytes have gone through: a disk filling up mid-file."""

    def __init__(self, file, budget: int, err: int):
        self.file, self.budget, self.err = file, budget, err

    def write(self, data):
        if len(data) > self.budget:
            self.file.write(bytes(memoryview(data)[:self.budget]))
            self.budget = 0
            raise OSError(self.err, os.strerror(self.err))
        self.budget -= len(data)
        return self.file.write(data)

    def tell(self):
        return self.file.tell()

    def writable(self):
        return True

    def fileno(self):
        return self.file.fileno()


def _inject_into_step(monkeypatch, step_name: str, err: int):
    """Every DCP file opened for writing inside `.<step_name>.tmp` fails: ENOSPC after some bytes (what a full
    disk does, which surfaces through torch.save as "unexpected pos"), EROFS/EACCES at open, as the OS does."""
    real = FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode or f".{step_name}.tmp" not in str(path):
            with real(self, path, mode) as stream:
                yield stream
            return
        if err != errno.ENOSPC:
            raise OSError(err, os.strerror(err), str(path))
        with real(self, path, mode) as stream:
            yield _FailingStream(stream, 3000, err)

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)


@pytest.mark.parametrize("mode", ["disabled", "async"])
@pytest.mark.parametrize("err", list(CAUSES))
def test_save_failure_is_one_line_keeps_previous_checkpoint_and_resumes_bitwise(
        straight, tmp_path, capsys, monkeypatch, err, mode):
    with monkeypatch.context() as patch:
        _inject_into_step(patch, "step-000004", err)
        code, out, err_text = _cli(capsys, tmp_path, f"--checkpoint.async_mode={mode}")
    assert code == 2
    line = _one_error_line(out, err_text)
    run = tmp_path / "d2"
    assert line.startswith("error: could not save checkpoint step 4: ") and CAUSES[err] in line
    assert str(run) in line and "step-000002, is intact" in line
    assert "checkpoint saved to" in out and "step-000004" not in out  # never announced, also not in async mode
    assert list_steps(run) == [2]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]

    resumed = _losses(tmp_path, f"--checkpoint.async_mode={mode}", "--checkpoint.resume_from_step=latest")
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in resumed:
        assert resumed[step] == straight[step], step  # bitwise on CPU
    assert list_steps(run) == [2, 4, 6]


def test_disk_full_without_errno_is_read_from_free_space(tmp_path, monkeypatch):
    """torch.save's zip writer reports a short write as RuntimeError("... unexpected pos ...") without the
    OSError; a disk with (almost) no free space left is then named as the cause."""
    from titanlite.fs_errors import write_failure_cause

    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    assert write_failure_cause(exc, tmp_path / "missing" / "deeper") == "no space left on device"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50 * 2**30))
    assert write_failure_cause(exc, tmp_path) is None


def test_leftover_tmp_of_a_killed_save_does_not_stop_a_resume(home, tmp_path):
    _losses(tmp_path, "--checkpoint.save_every=2", "--debug.stop_after_steps=2")
    leftover = tmp_path / "d2" / ".step-000004.tmp"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"\0" * 4096)  # what a SIGKILL mid-save leaves
    resumed = _losses(tmp_path, "--checkpoint.resume_from_step=latest", "--debug.stop_after_steps=3")
    assert sorted(resumed) == [3]
    assert not leftover.exists()


def _fail_write_text(monkeypatch, name: str, err: int):
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name:
            raise OSError(err, os.strerror(err), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_read_only_dump_folder_is_one_line(home, tmp_path, capsys, monkeypatch):
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == tmp_path / "ro" / "d2":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, out, err = _cli(capsys, tmp_path / "ro")
    assert code == 2
    line = _one_error_line(out, err)
    assert line.startswith(f"error: cannot create the run folder {tmp_path / 'ro' / 'd2'}: read-only file system")


@pytest.mark.parametrize("name, err", [("config.toml", errno.ENOSPC), ("summary.json", errno.EACCES)])
def test_run_files_failing_are_one_line(home, tmp_path, capsys, monkeypatch, name, err):
    _fail_write_text(monkeypatch, name, err)
    code, out, err_text = _cli(capsys, tmp_path, "--training.num_iterations=2")
    assert code == 2
    line = _one_error_line(out, err_text)
    assert line.startswith(f"error: cannot write {tmp_path / 'd2' / name}: {CAUSES[err]}")
    if name == "summary.json":  # the run itself completed: its final checkpoint is there
        assert list_steps(tmp_path / "d2") == [2]
    assert not (tmp_path / "d2" / "run.lock").exists()  # released on the way out


def test_tensorboard_folder_turning_read_only_is_one_line(home, tmp_path, capsys, monkeypatch):
    from tensorboard.compat.tensorflow_stub.io import gfile

    real = gfile.LocalFileSystem.append
    calls = []

    def append(self, filename, file_content, binary_mode=False):
        calls.append(filename)
        if len(calls) > 1:  # the event file's header goes through; later events hit a read-only folder
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), filename)
        return real(self, filename, file_content, binary_mode)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", append)
    code, out, err = _cli(capsys, tmp_path, "--metrics.tensorboard=true", "--training.num_iterations=2")
    assert code == 2
    line = _one_error_line(out, err)
    assert line.startswith("error: cannot write ") and str(tmp_path / "d2" / "tb") in line
    assert "read-only file system" in line
