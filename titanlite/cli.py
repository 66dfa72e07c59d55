"""Entry-point wrapper: user mistakes become one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from titanlite.errors import UserError

USER_ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130


class Stop(Exception):
    """A deliberate stop with its own exit code, e.g. after a SIGTERM (143): one line, or none when empty."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, also when DCP caught it mid-save and wrapped it in a CheckpointException ({rank: (exc, tb)})."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        return any(isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt) for f in failures.values())
    return False


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except Stop as exc:
        sys.stdout.flush()
        if str(exc):
            print(str(exc), file=sys.stderr, flush=True)
        return exc.exit_code
    except BaseException as exc:  # noqa: BLE001 - only interrupts are handled here, the rest is re-raised
        if not is_interrupt(exc):
            raise
        sys.stdout.flush()
        print("error: interrupted by the user (Ctrl-C); checkpoints already written are intact",
              file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
