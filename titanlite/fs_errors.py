"""A failed file write as one line: the path, and the cause in the words a user acts on.

Writes fail in three ways a user can fix: the disk is full, the folder is read-only, or it belongs to someone
else. The errno that says which is not always on the surface: DCP wraps each rank's exception in a
CheckpointException, and torch.save reports a short write as `RuntimeError: [enforce fail at
inline_container.cc:...] unexpected pos`, with the OSError at best in the exception's context.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from titanlite.errors import UserError

CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# A write that failed without an errno on a disk with less free space than this ran out of space: torch's zip
# writer checks its position after each write and reports "unexpected pos" when the disk took fewer bytes.
LOW_FREE_BYTES = 16 * 2**20


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The first OSError with an errno in `exc`, its cause/context chain, or the per-rank failures DCP wraps."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        failures = getattr(current, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            for _rank, failure in sorted(failures.items(), key=lambda kv: kv[0]):
                pending.append(failure[0] if isinstance(failure, tuple) else failure)
        pending.extend((current.__cause__, current.__context__))
    return None


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_is_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(_nearest_existing(path)).free < LOW_FREE_BYTES
    except OSError:
        return False


def write_failure_cause(exc: BaseException, path: Path) -> str | None:
    """"no space left on device", "read-only file system", ... for a failed write under `path`; None when the
    failure is not a filesystem one. Call it before removing partial files: they are what filled the disk."""
    os_error = find_os_error(exc)
    if os_error is not None:
        return CAUSES.get(os_error.errno) or os.strerror(os_error.errno).lower()
    if disk_is_full(path):
        return "no space left on device"
    return None


def failed_path(exc: BaseException, default: Path | str) -> str:
    """The file the OS refused (when the error names one), else `default`."""
    os_error = find_os_error(exc)
    if os_error is not None and os_error.filename:
        return str(os_error.filename)
    return str(default)


def fs_error_line(action: str, path: Path | str, exc: BaseException, advice: str = "") -> str | None:
    """`cannot <action> <path>: <cause>; <advice>`, or None when `exc` is not a filesystem failure."""
    cause = write_failure_cause(exc, Path(path))
    if cause is None:
        return None
    return f"cannot {action} {failed_path(exc, path)}: {cause}" + (f"; {advice}" if advice else "")


@contextlib.contextmanager
def reported_fs_errors(action: str, path: Path | str, advice: str = "") -> Iterator[None]:
    """Turn an OSError inside the block into one UserError line naming the path and the cause."""
    try:
        yield
    except OSError as exc:
        line = fs_error_line(action, path, exc, advice)
        raise UserError(line or f"cannot {action} {failed_path(exc, path)}: {exc.strerror or exc}") from None
