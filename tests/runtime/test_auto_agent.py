"""Transparent mode under the agent.

1. ``lattice run --auto`` on an unmodified script (tests/helpers/plain_train.py): its worker is
SIGKILLed three times at random steps, the agent restarts it each time, and the final weights are
bit-identical to an uninterrupted plain ``python`` run.

2. A data-parallel job: an unmodified DDP script with ``DistributedSampler``
under ``lattice agent --auto`` goes 2 -> 3 -> 2 -> 1 agents (a node joins, two leave on SIGTERM),
then the last agent is preempted (SIGTERM) and a new one finishes the job. Checkpoints are taken
only by those planned events (the step policy never fires), so the test shows that each of them
checkpoints at the next step boundary: every sample of every epoch is trained on exactly once
(a recomputed step would repeat its samples), and the global batch stays 12 throughout."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from agent_support import LATTICE, ROOT, Proc, serve

SCRIPT = str(ROOT / "tests" / "helpers" / "ddp_plain.py")
EPOCHS, SAMPLES = 2, 720
PLAIN = str(ROOT / "tests" / "helpers" / "plain_train.py")
PLAIN_EPOCHS, PLAIN_BATCHES = 5, 12


def same_bits(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(np.array_equal(x[k].view(np.uint8), y[k].view(np.uint8)) for k in x)


@pytest.mark.timeout(240)
def test_lattice_run_auto_three_worker_sigkills_end_bit_identical(tmp_path: Path) -> None:
    reference = tmp_path / "reference.safetensors"
    subprocess.run([sys.executable, PLAIN, str(reference), str(PLAIN_EPOCHS)], check=True, timeout=120,
                   capture_output=True)
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    out = tmp_path / "final.safetensors"
    p = Proc([*LATTICE, "run", "--auto", "--max-restarts", "3", "--checkpoint-dir", str(tmp_path / "ckpt"),
              PLAIN, str(out), str(PLAIN_EPOCHS)], tmp_path,
             env={"LATTICE_EVERY_STEPS": "5", "LATTICE_ON_BUSY": "wait", "PLAIN_TRAIN_SLEEP": "0.01"})
    kills: list[int] = []
    try:
        since = 0
        for _ in range(3):
            started = p.wait_for(lambda ln: "started 1 worker(s)" in ln, 90, after=since)
            mark, n = p.mark(), rng.randint(3, 15)
            p.wait_for(lambda _, m=mark, n=n: sum("]: epoch " in ln for ln in p.lines[m:]) >= n, 90, after=mark)
            since = p.mark()
            os.kill(int(re.search(r"pids (\d+)", started).group(1)), signal.SIGKILL)
            kills.append(n)
        assert p.wait(120) == 0, f"seed {seed}\n" + p.text[-3000:]
    finally:
        p.kill()
    assert p.text.count("started 1 worker(s)") == 4, f"seed {seed}: {kills}"
    assert same_bits(out, reference), f"seed {seed}: weights differ after kills {kills}"


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
