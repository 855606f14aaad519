"""Node limits published from outside a running job (what the operator does when a TrainingJob's
minSize/maxSize change): lowering the minimum lets a survivor that waits for a second agent go
on alone, without restarting it and without a new agent bringing the new limits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agent_support import LATTICE, WORKER, Proc, serve, wait_committed

from lattice.runtime.kv import create_backend
from lattice.runtime.rendezvous.decide import RoundState
from lattice.runtime.rendezvous.limits import publish_limits


def agent(tmp: Path, endpoint: str) -> Proc:
    return Proc([*LATTICE, "agent", "--nnodes", "2:3", "--rdzv-endpoint", endpoint, "--rdzv-id", "lim",
                 "--ttl", "1", "--last-call", "1", "--grace", "20",
                 "--checkpoint-dir", str(tmp / "ckpt"), WORKER, "--out", str(tmp), "--steps", "100000",
                 "--sleep", "0.05", "--every", "10"], tmp)


@pytest.mark.timeout(120)
def test_a_lowered_minimum_reaches_running_agents(tmp_path: Path) -> None:
    server, endpoint = serve(tmp_path)
    procs = [server]
    store = create_backend("embedded", url=f"http://{endpoint}")
    try:
        assert not publish_limits(store, "lim", 1, 1, 3)  # no round document yet: nothing to tell
        a, b = agent(tmp_path, endpoint), agent(tmp_path, endpoint)
        procs += [a, b]
        for p in (a, b):
            p.wait_for(lambda ln: "start step 0 world 2" in ln, 60)
        a.wait_for(lambda ln: ln.endswith("]: step 12"), 60)
        wait_committed(tmp_path / "ckpt", 10)
        mark = a.mark()
        b.kill()
        a.wait_for(lambda ln: "peer-lost" in ln, 30, after=mark)
        time.sleep(4)  # well past the session TTL and the last call
        assert not [ln for ln in a.lines[mark:] if "start step" in ln], a.text  # minimum 2: it waits for a peer
        assert publish_limits(store, "lim", 1, 1, 3)
        assert not publish_limits(store, "lim", 1, 1, 3)  # the same generation again: no write
        line = a.wait_for(lambda ln: "world 1" in ln and "start step" in ln, 60, after=mark)
        assert int(line.split("start step ")[1].split()[0]) >= 10  # resumed from its checkpoint, alone
        doc = RoundState.from_json(store.get("lattice/lim/state").value)  # type: ignore[union-attr]
        assert doc.sizes == (1, 1, 3)
    finally:
        store.close()
        for p in procs:
            p.kill()
