"""Two agents (a two-node job) checkpointing to the checkpoint service (``lattice://``): every
rank's part goes to the service and rank 0 commits there (core/stores/assemble.py). A planned
stop (SIGTERM to one agent) loses no step; the survivor resumes from the service."""

from __future__ import annotations

import re
import secrets
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from agent_support import LATTICE, WORKER, Proc, last_step_before, serve, wait_committed
from kv_support import free_port

from lattice.core.stores import open_store


def service(tmp: Path) -> tuple[Proc, str, str]:
    """``lattice checkpoint-service serve`` on a free loopback port; (process, address, token)."""
    token = secrets.token_hex(16)
    (tmp / "token").write_text(token)
    port = free_port()
    p = Proc([*LATTICE, "checkpoint-service", "serve", "--root", str(tmp / "service"), "--host", "127.0.0.1",
              "--port", str(port), "--token-file", str(tmp / "token")], tmp)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1).read()
            return p, f"127.0.0.1:{port}", token
        except OSError:
            if time.monotonic() > deadline or p.proc.poll() is not None:
                p.kill()
                raise AssertionError("the checkpoint service did not start:\n" + p.text) from None
            time.sleep(0.1)


@pytest.mark.timeout(180)
def test_two_agents_checkpoint_to_the_service_and_a_planned_stop_loses_nothing(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    svc, address, token = service(tmp_path)
    server, endpoint = serve(tmp_path)
    procs = [svc, server]
    monkeypatch.setenv("LATTICE_SERVICE_TOKEN", token)
    url = f"lattice://{address}/two-nodes"
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
        mark = a.mark()
        b.signal(signal.SIGTERM)
        assert b.wait(60) == 0, b.text
        down = a.wait_for(lambda ln: "world 1" in ln and "start step" in ln, 60, after=mark)
        down_step = int(re.search(r"start step (\d+)", down).group(1))
        assert down_step == last_step_before(a, down) > 25  # the planned checkpoint, from the service
        assert down_step in open_store(url).list_committed()
    finally:
        for p in procs:
            p.kill()
