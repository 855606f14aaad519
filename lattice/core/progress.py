"""A minimal progress line on stderr for work over many bytes (only when it is big enough to matter)."""

from __future__ import annotations

import sys
import time
from typing import Any

THRESHOLD = 1 << 30  # show progress for work of 1 GiB or more


class Progress:
    """``with Progress("verify", total) as p: p.update(n)``; silent below ``THRESHOLD`` bytes."""

    def __init__(self, label: str, total: int, stream: Any = None, threshold: int = THRESHOLD):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.enabled = total >= threshold
        self._t0 = self._last = time.monotonic()

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.5:
            self._last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "\r") -> None:
        pct = 100.0 * self.done / max(self.total, 1)
        rate = self.done / max(now - self._t0, 1e-9) / 1e9
        self.stream.write(f"{self.label}: {pct:5.1f}% of {self.total / 1e9:.2f} GB, {rate:.2f} GB/s{end}")
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(time.monotonic(), end="\n")
