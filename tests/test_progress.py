"""The progress line: redrawn in place on a terminal, whole lines in a log, silent below the threshold."""

from __future__ import annotations

import io
import types

import pytest

from lattice.core import progress
from lattice.core.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A clock the test moves, seen by ``progress`` only (not the process-wide ``time`` module)."""
    now = [100.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def run(stream: io.StringIO, clock: list[float], steps: int, dt: float) -> str:
    with Progress("download step-1", 10 * steps, stream=stream, threshold=1) as bar:
        for _ in range(steps):
            clock[0] += dt
            bar.update(10)
    return stream.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place(clock: list[float]) -> None:
    out = run(Terminal(), clock, steps=4, dt=1.0)
    assert out.count("\r") == 4 and out.count("\n") == 1 and out.endswith("100.0% of 0.00 GB, 0.00 GB/s\n")


def test_a_log_gets_whole_lines_every_ten_seconds_and_at_the_end(clock: list[float]) -> None:
    out = run(io.StringIO(), clock, steps=25, dt=1.0)  # 25 s of work
    lines = out.split("\n")
    assert "\r" not in out
    assert [line.split(":")[1].split("%")[0].strip() for line in lines if line] == ["40.0", "80.0", "100.0"]


def test_small_work_prints_nothing(clock: list[float]) -> None:
    stream = Terminal()
    with Progress("verify", 100, stream=stream, threshold=1000) as bar:
        clock[0] += 5
        bar.update(100)
    assert stream.getvalue() == ""
