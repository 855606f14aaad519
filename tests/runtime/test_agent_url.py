"""Two agents (a two-node job) checkpointing to the checkpoint service (``lattice://``): every
rank's part goes to the service and rank 0 commits there (core/stores/assemble.py). A planned
stop (SIGTERM to one agent) loses no step; the survivor resumes from the service."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_support import (
    LATTICE,
    WORKER,
    Proc,
    last_step_before,
    leave_gracefully,
    serve,
    wait_committed,
)
from service_support import ServiceProc

from lattice.core.stores import open_store


@pytest.mark.timeout(180)
def test_two_agents_checkpoint_to_the_service_and_a_planned_stop_loses_nothing(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "svc").mkdir()
    svc = ServiceProc(tmp_path / "service", tmp_path / "svc").start()
    server, endpoint = serve(tmp_path)
    procs = [svc, server]
    monkeypatch.setenv("LATTICE_SERVICE_TOKEN", svc.token)
    url = f"lattice://127.0.0.1:{svc.port}/two-nodes"
    try:
        def agent(name: str) -> Proc:
            return Proc([*LATTICE, "agent", "--nnodes", "1:2", "--rdzv-endpoint", endpoint, "--rdzv-id", "url",
                         "--ttl", "1", "--last-call", "1", "--grace", "30", "--checkpoint-dir", url,
                         WORKER, "--out", str(tmp_path), "--steps", "100000", "--sleep", "0.05", "--every", "10"],
                        tmp_path, env={"LATTICE_STAGING_DIR": str(tmp_path / f"host-{name}")})

        a, b = agent("a"), agent("b")
        procs += [a, b]
        a.wait_for(lambda ln: "start step 0 world 2" in ln, 60)
        b.wait_for(lambda ln: "start step 0 world 2" in ln, 60)
        a.wait_for(lambda ln: ln.endswith("]: step 25"), 60)
        wait_committed(url, 20)  # policy checkpoints of both ranks, committed in the service
        down, down_step = leave_gracefully(a, b)
        assert down_step == last_step_before(a, down) > 25  # the planned checkpoint, from the service
        assert down_step in open_store(url).list_committed()
    finally:
        for p in procs:
            p.kill()
