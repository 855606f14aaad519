"""A minimal progress line on stderr for work over many bytes (only when it is big enough to matter).

On a terminal the line is redrawn in place twice a second. Anywhere else (a log file, a
Kubernetes pod's log) a carriage return would glue every redraw into one endless line, so a
complete line is written every ``LOG_INTERVAL`` seconds instead, and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

THRESHOLD = 1 << 30  # show progress for work of 1 GiB or more
TTY_INTERVAL = 0.5  # seconds between redraws on a terminal
LOG_INTERVAL = 10.0  # seconds between lines elsewhere


class Progress:
    """``with Progress("verify", total) as p: p.update(n)``; silent below ``threshold`` bytes."""

    def __init__(self, label: str, total: int, stream: Any = None, threshold: int = THRESHOLD):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.enabled = total >= threshold
        self.tty = self.enabled and _isatty(self.stream)
        self.interval = TTY_INTERVAL if self.tty else LOG_INTERVAL
        self._t0 = self._last = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now, end="\r" if self.tty else "\n")

    def _draw(self, now: float, end: str) -> None:
        pct = 100.0 * self.done / max(self.total, 1)
        rate = self.done / max(now - self._t0, 1e-9) / 1e9
        self.stream.write(f"{self.label}: {pct:5.1f}% of {self.total / 1e9:.2f} GB, {rate:.2f} GB/s{end}")
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(time.monotonic(), end="\n")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no such method, or a closed stream
        return False
