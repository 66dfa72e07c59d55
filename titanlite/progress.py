"""A tiny progress bar for long data steps (downloads, corpus building, tokenizer training).

Dependency-free on purpose. It writes to stderr only, so stdout (the step log) stays clean:
- on a terminal it redraws one line in place, at most every 0.1 s;
- otherwise (CI logs, files) it writes a plain line only at coarse intervals (every 10% or 30 s),
  so logs do not fill with thousands of updates.
Only rank 0 draws (RANK from the environment), so multi-process runs do not interleave bars.
"""

from __future__ import annotations

import os
import sys
import time

_TTY_INTERVAL_S = 0.1
_LOG_INTERVAL_S = 30.0
_LOG_FRACTION_STEP = 0.1


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000.0
    return f"{n:.1f}P"


class Progress:
    """`with Progress(total, "tokenizing", unit="docs") as bar: bar.update(n)`; total may be None."""

    def __init__(self, total: float | None, desc: str, unit: str = "", enabled: bool | None = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.count = 0.0
        if enabled is None:
            enabled = int(os.environ.get("RANK", "0")) == 0
        self.enabled = enabled
        self._tty = enabled and sys.stderr.isatty()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_fraction = 0.0
        self._drawn_count = -1.0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            if now - self._last_draw >= _TTY_INTERVAL_S:
                self._draw(now)
            return
        fraction = self.count / self.total if self.total else 0.0
        if now - self._last_draw >= _LOG_INTERVAL_S or fraction - self._last_fraction >= _LOG_FRACTION_STEP:
            self._last_fraction = fraction
            self._draw(now)

    def close(self) -> None:
        if not self.enabled:
            return
        # Always leave a final line so the log shows the step finished and how long it took.
        if self._tty or self._drawn_count != self.count:
            self._draw(time.monotonic(), final=True)
        self.enabled = False

    def _line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.count / elapsed
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            pct = min(100.0, 100.0 * self.count / self.total)
            width = 20
            filled = int(width * pct / 100)
            bar = "#" * filled + "-" * (width - filled)
            return (f"{self.desc}: [{bar}] {pct:5.1f}% {_human(self.count)}/{_human(self.total)}{unit} "
                    f"({_human(rate)}{unit}/s, {elapsed:.0f}s)")
        return f"{self.desc}: {_human(self.count)}{unit} ({_human(rate)}{unit}/s, {elapsed:.0f}s)"

    def _draw(self, now: float, final: bool = False) -> None:
        self._last_draw = now
        self._drawn_count = self.count
        line = self._line(now)
        if self._tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
