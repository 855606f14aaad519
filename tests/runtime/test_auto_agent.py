"""Transparent mode on a data-parallel job: an unmodified DDP script with ``DistributedSampler``
under ``lattice agent --auto`` goes 2 -> 3 -> 2 -> 1 agents (a node joins, two leave on SIGTERM),
then the last agent is preempted (SIGTERM) and a new one finishes the job. Checkpoints are taken
only by those planned events (the step policy never fires), so the test shows that each of them
checkpoints at the next step boundary: every sample of every epoch is trained on exactly once
(a recomputed step would repeat its samples), and the global batch stays 12 throughout."""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

import pytest
from agent_support import LATTICE, ROOT, Proc, serve

SCRIPT = str(ROOT / "tests" / "helpers" / "ddp_plain.py")
EPOCHS, SAMPLES = 2, 720


def agent(tmp: Path, endpoint: str) -> Proc:
    return Proc([*LATTICE, "agent", "--auto", "--nnodes", "1:3", "--rdzv-endpoint", endpoint, "--rdzv-id", "ae",
                 "--ttl", "1", "--last-call", "1", "--grace", "30", "--checkpoint-dir", str(tmp / "ckpt"),
                 SCRIPT, str(tmp / "out"), str(EPOCHS), "0.04"], tmp, env={"LATTICE_EVERY_STEPS": "100000"})


def steps_done(p: Proc, after: int = 0) -> int:
    return sum(1 for line in p.lines[after:] if re.search(r"\]: epoch \d+ batch \d+$", line))


def wait_steps(p: Proc, n: int, after: int) -> None:
    p.wait_for(lambda _: steps_done(p, after) >= n, 90, after=after)


def wait_world(p: Proc, world: int, after: int) -> None:
    p.wait_for(lambda ln: "started" in ln and f"world {world} x 1" in ln, 90, after=after)


@pytest.mark.timeout(300)
def test_planned_resizes_and_preemption_recompute_no_step_and_keep_the_global_batch(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    server, endpoint = serve(tmp_path)
    procs = [server]
    try:
        a, b = agent(tmp_path, endpoint), agent(tmp_path, endpoint)
        procs += [a, b]
        wait_world(a, 2, 0)
        wait_steps(a, 8, 0)
        mark = a.mark()
        c = agent(tmp_path, endpoint)  # scale up: a node joins
        procs.append(c)
        wait_world(a, 3, mark)
        wait_steps(a, 8, a.mark())
        mark = a.mark()
        c.signal(signal.SIGTERM)  # scale down: a node leaves
        assert c.wait(60) == 0, c.text
        wait_world(a, 2, mark)
        wait_steps(a, 8, a.mark())
        mark = a.mark()
        b.signal(signal.SIGTERM)
        assert b.wait(60) == 0, b.text
        wait_world(a, 1, mark)
        wait_steps(a, 5, a.mark())
        a.signal(signal.SIGTERM)  # preemption of the last node
        assert a.wait(60) == 0, a.text
        d = agent(tmp_path, endpoint)
        procs.append(d)
        assert d.wait(150) == 0, d.text[-3000:]
    finally:
        for p in procs:
            p.kill()
    batches = [line.split() for f in (tmp_path / "out").glob("consumed-*.txt") for line in f.read_text().splitlines()]
    for epoch in range(EPOCHS):
        seen = Counter(int(i) for e, _, *idx in batches if int(e) == epoch for i in idx)
        assert sorted(seen) == list(range(SAMPLES)), f"epoch {epoch}: samples missing"
        assert set(seen.values()) == {1}, f"epoch {epoch}: recomputed {[i for i, n in seen.items() if n > 1][:10]}"
    sizes = {(int(w), len(idx)) for _, w, *idx in batches}
    assert sizes == {(2, 6), (3, 4), (1, 12)}  # the global batch stays 12: 2 x 6, 3 x 4, 1 x 12
    assert "global batch" not in d.text  # it could be kept every time: no warning
