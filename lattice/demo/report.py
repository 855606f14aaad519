"""The elastic demo's timeline: for each event, the steps lost and how long recovery took,
computed from the per-step training log (rank 0's JSON lines)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class Event:
    """Something the demo did to the job, at ``time`` (``time.time()``)."""

    name: str
    planned: bool
    time: float
    label: str = ""  # short, for the plot


@dataclasses.dataclass
class Row:
    """What one event cost the job (None where the log has no later round)."""

    event: Event
    last_step: int | None  # the last step completed in the round the event ended
    resumed_from: int | None  # the step the next round started from (its first step - 1)
    recovery_s: float | None  # from the event to the first step completed by the next round
    pause_s: float | None  # from the old round's last step to the next round's first
    world: tuple[int | None, int | None]  # world size before -> after

    @property
    def lost(self) -> int | None:
        if self.last_step is None or self.resumed_from is None:
            return None
        return self.last_step - self.resumed_from


def analyse(records: Sequence[dict[str, Any]], events: Sequence[Event]) -> list[Row]:
    """One :class:`Row` per event, from the training log ``records`` (in the order written)."""
    return [_row(records, ev) for ev in events]


def _row(records: Sequence[dict[str, Any]], ev: Event) -> Row:
    before = [r for r in records if r["time"] <= ev.time]
    if not before:
        return Row(ev, None, None, None, None, (None, None))
    round_ = int(before[-1]["round"])
    old = [r for r in records if int(r["round"]) == round_]
    nxt = next((r for r in records if int(r["round"]) > round_), None)
    last = max(old, key=lambda r: r["step"])
    if nxt is None:
        return Row(ev, last["step"], None, None, None, (last["world"], None))
    return Row(ev, last["step"], nxt["step"] - 1, nxt["time"] - ev.time, nxt["time"] - old[-1]["time"],
               (last["world"], nxt["world"]))


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[Row], t0: float) -> str:
    """The timeline as a text table (times in seconds since ``t0``)."""
    head = (f"{'t':>6}  {'event':44} {'kind':9} {'last step':>9} {'resumed':>8} {'lost':>5}"
            f" {'recovery':>9} {'paused':>7}  world")
    lines = [head, "-" * len(head)]
    for r in rows:
        ev = r.event
        lines.append(f"{ev.time - t0:5.1f}s  {ev.name[:44]:44} {'planned' if ev.planned else 'UNPLANNED':9}"
                     f" {_fmt(r.last_step):>9} {_fmt(r.resumed_from):>8} {_fmt(r.lost):>5}"
                     f" {_fmt(r.recovery_s, '.1f') + ' s':>9} {_fmt(r.pause_s, '.1f') + ' s':>7}"
                     f"  {_fmt(r.world[0])} -> {_fmt(r.world[1])}")
    return "\n".join(lines)


LEGEND = ("last step: the last step completed before the job stopped for the event; resumed: the step\n"
          "the next round restored (checkpoint); lost = last step - resumed (work done twice);\n"
          "recovery: from the event to the next completed step; paused: time without any step.")
