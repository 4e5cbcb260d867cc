"""Progress you can see while work runs: steps of an epoch, images decoded, images predicted.

On a terminal, one line rewritten in place (cleared when the work is done, so the lines that
stay are the summaries); elsewhere (a pipe: `dvc repro`, CI logs, a file) a plain line every
few seconds, so that a log shows the run alive without one line per step.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

EVERY_SECONDS = 10.0  # between lines when the output is not a terminal
TERMINAL_EVERY_SECONDS = 0.2  # between redraws on a terminal


class Progress:
    """`done` of `total` items, reported to `stream` as `<label> done/total unit (rate/s)...`."""

    def __init__(self, label: str, total: int, unit: str = "images",
                 stream: TextIO | None = None, every: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stdout
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else (
            TERMINAL_EVERY_SECONDS if self.terminal else EVERY_SECONDS)
        self.started = self._last = time.perf_counter()
        self.done = 0
        self._drawn = False

    def update(self, done: int, rate_count: int | None = None, extra: str = "") -> None:
        """Report `done` items (a rate from `rate_count` items, default `done`), at most once
        per interval."""
        self.done = done
        now = time.perf_counter()
        if now - self._last < self.every:
            return
        self._last = now
        rate = (done if rate_count is None else rate_count) / max(now - self.started, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        line = (f"{self.label} {done}/{self.total}{unit}, {rate:.0f} images/s"
                + (f", {extra}" if extra else ""))
        if self.terminal:
            self.stream.write(f"\r\033[K{line}")
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Clear the line drawn on a terminal."""
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
