"""``lattice demo`` (the elastic quick-start job) end to end, as a user runs it: DDP workers
under three local agents, a SIGKILLed worker, a scale up and a scale down; then its timeline
and its plot."""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from agent_support import LATTICE

from lattice.demo.procs import compact
from lattice.demo.report import Event, analyse

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.timeout(150)
def test_elastic_demo_recovers_and_reports_a_timeline(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    out = subprocess.run([*LATTICE, "demo", "--workdir", str(work), "--steps", "200", "--sleep", "0.03"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=140)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    rows = {m["event"]: m for m in re.finditer(
        r"^\s*[\d.]+s  (?P<event>SIGKILL worker|agent-3 started|SIGTERM to agent-1).*?"
        r"(?P<kind>UNPLANNED|planned)\s+(?P<last>\d+)\s+(?P<resumed>\d+)\s+(?P<lost>\d+)\s+(?P<rec>[\d.]+) s",
        text, re.M)}
    assert set(rows) == {"SIGKILL worker", "agent-3 started", "SIGTERM to agent-1"}, text
    assert rows["SIGKILL worker"]["kind"] == "UNPLANNED"
    assert int(rows["SIGKILL worker"]["resumed"]) % 10 == 0  # from a checkpoint (every 10 steps)
    assert rows["agent-3 started"]["lost"] == "0" and rows["SIGTERM to agent-1"]["lost"] == "0"
    assert "Traceback" not in out.stdout  # worker tracebacks are summed up in one line

    root = ET.parse(work / "loss.svg").getroot()
    assert root.tag == f"{SVG}svg"
    assert root.findall(f".//{SVG}polyline") or root.findall(f".//{SVG}path")
    assert len([ln for ln in root.iter(f"{SVG}line") if ln.get("stroke-dasharray")]) == 3  # the events


def test_timeline_counts_lost_steps_from_the_last_step_to_the_resumed_one() -> None:
    recs = [{"step": s, "loss": 1.0, "world": 2, "time": 100.0 + s, "round": 0} for s in range(1, 26)]
    recs += [{"step": s, "loss": 1.0, "world": 2, "time": 130.0 + s, "round": 1} for s in range(21, 31)]
    (row,) = analyse(recs, [Event("kill", False, 125.5)])
    assert (row.last_step, row.resumed_from, row.lost) == (25, 20, 5)
    assert row.recovery_s == pytest.approx(151 - 125.5) and row.pause_s == pytest.approx(151 - 125)
    (late,) = analyse(recs[:25], [Event("kill", False, 125.5)])
    assert late.resumed_from is None and late.lost is None


def test_agent_output_is_compacted() -> None:
    log = ("2026-01-01 00:00:00,000 INFO lattice.agent: [job=demo node=n round=0 rank=0] round 0 ended: "
           "peer-lost PeerLost(round=0, nodes=(), reason='round moved on to 1 (open)')")
    assert compact(log) == "round 0 ended: peer-lost peer lost (round moved on to 1 (open))"
    assert compact("2026-01-01 00:00:00,000 INFO lattice.agent: asked the workers to checkpoint") is None
    assert compact("[rank1]: step 7") is None
    assert compact("[rank0]: step 50 loss 0.1 world 2") == "rank 0| step 50 loss 0.1 world 2"
    assert compact("[rank1]: [rank1]:   File \"x.py\", line 1") is None
    assert compact("[rank1]: [rank1]: RuntimeError: boom").startswith("rank 1| RuntimeError: boom")
