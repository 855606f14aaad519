"""The control channel between an agent and one worker: a 64-byte shared file mapped by both.

The worker writes its step count there at every ``lattice.step()`` (a memory store, no
system call) and reads the agent's stop request; the agent reads the step and writes the
request. Layout (little-endian int64): [0] worker step, [1] stop state (0 none, 1 stop at
the step in [2], 2 hold: wait at the step in [2] until the agents agree on the final one),
[2] stop at step (0 = the next step), [3] worker pid, [4] last committed step (-1 none),
[5] last snapshot stall in microseconds, [6] last persist duration in microseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

SIZE = 64
NONE, STOP, HOLD = 0, 1, 2
_STEP, _STOP, _AT, _PID, _COMMITTED, _STALL, _PERSIST = 0, 8, 16, 24, 32, 40, 48


class ControlFile:
    """One side of the control channel (agent or worker)."""

    def __init__(self, path: Path, mm: mmap.mmap):
        self.path, self._mm = path, mm

    @classmethod
    def create(cls, path: Path) -> ControlFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * SIZE)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ControlFile:
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), SIZE)
        return cls(Path(path), mm)

    def _get(self, off: int) -> int:
        return struct.unpack_from("<q", self._mm, off)[0]

    def _set(self, off: int, value: int) -> None:
        struct.pack_into("<q", self._mm, off, value)

    @property
    def step(self) -> int:
        return self._get(_STEP)

    def report(self, step: int) -> None:
        self._set(_STEP, step)

    def request_stop(self, at_step: int = 0) -> None:
        """Final: checkpoint at ``at_step`` (the step is written before the state)."""
        self._set(_AT, at_step)
        self._set(_STOP, STOP)

    def request_hold(self, at_step: int) -> None:
        """Provisional: do not pass ``at_step`` until a final stop step (or a later hold) comes."""
        self._set(_AT, at_step)
        self._set(_STOP, HOLD)

    def stop_requested(self, step: int, hold_limit: float = 120.0) -> bool:
        """True if the agent asked for a stop that is due at ``step``.

        While the agent holds this worker at ``step`` (the agents of a job are still agreeing
        on the step every rank stops at), this blocks; after ``hold_limit`` seconds without an
        answer (the agent is gone) the hold counts as a stop here.
        """
        state = self._get(_STOP)
        if state == NONE:  # every step of a run without a stop: one memory load
            return False
        deadline = time.monotonic() + hold_limit
        while state == HOLD and step >= self._get(_AT):
            if time.monotonic() > deadline:
                return True
            time.sleep(0.002)
            state = self._get(_STOP)
        return state == STOP and step >= self._get(_AT)

    def report_checkpoint(self, committed: int, stall_s: float, persist_s: float) -> None:
        self._set(_STALL, int(stall_s * 1e6))
        self._set(_PERSIST, int(persist_s * 1e6))
        self._set(_COMMITTED, committed + 1)

    @property
    def checkpoint(self) -> tuple[int | None, float, float]:
        """(last committed step or None, snapshot stall s, persist s) as the worker reported them."""
        committed = self._get(_COMMITTED)
        return (committed - 1 if committed else None), self._get(_STALL) / 1e6, self._get(_PERSIST) / 1e6

    def close(self) -> None:
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass
