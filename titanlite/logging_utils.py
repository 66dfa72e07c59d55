"""The single titanlite logger. Rank 0 prints; other ranks stay quiet unless asked."""

import logging
import os
import sys

logger = logging.getLogger("titanlite")


class _CurrentStdout(logging.StreamHandler):
    """Writes to sys.stdout as it is at each message, not as it was at start: a redirect made later (a
    notebook cell, a test's capture) gets the lines, and a closed earlier stream is never written to."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides
        pass


def init_logger(rank: int | None = None) -> None:
    """Route titanlite messages to stdout, only on rank 0 (or every rank with TITANLITE_LOG_ALL_RANKS=1)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    for handler in list(logger.handlers):
        if getattr(handler, "_titanlite_console", False):  # replace ours only; keep e.g. a test's capture
            logger.removeHandler(handler)
    logger.propagate = False
    if rank == 0 or os.environ.get("TITANLITE_LOG_ALL_RANKS") == "1":
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.setLevel(logging.INFO)
    else:
        handler = logging.NullHandler()
        logger.setLevel(logging.WARNING)
    handler._titanlite_console = True
    logger.addHandler(handler)
