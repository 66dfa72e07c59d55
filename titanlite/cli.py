"""Entry-point wrapper: user mistakes become one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from titanlite.errors import UserError

USER_ERROR_EXIT_CODE = 2


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("error: interrupted by the user (Ctrl-C); checkpoints already written are intact",
              file=sys.stderr, flush=True)
        return 130
