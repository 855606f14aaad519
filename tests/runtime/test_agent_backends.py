"""The agent against the other rendezvous backends (a real etcd, and the consul backend against
a separately served embedded store) and its Prometheus metrics endpoint."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest
from agent_support import LATTICE, WORKER, Proc, serve
from kv_support import free_port


def run_with(tmp: Path, *flags: str, steps: str = "12") -> Proc:
    return Proc([*LATTICE, "run", "--nproc-per-node", "2", "--checkpoint-dir", str(tmp / "ckpt"), *flags,
                 WORKER, "--out", str(tmp), "--steps", steps, "--every", "5"], tmp)


@pytest.mark.timeout(90)
def test_lattice_run_over_a_real_etcd(tmp_path: Path, etcd_url: str) -> None:
    p = run_with(tmp_path, "--rdzv-backend", "etcd", "--rdzv-endpoint", etcd_url.removeprefix("http://"),
                 "--rdzv-id", f"etcd-{time.time_ns()}")
    try:
        assert p.wait(80) == 0, p.text
    finally:
        p.kill()
    assert "[rank0]: done 12" in p.text and "[rank1]: done 12" in p.text


@pytest.mark.timeout(90)
def test_lattice_run_with_the_consul_backend_against_a_served_store(tmp_path: Path) -> None:
    server, endpoint = serve(tmp_path)
    try:
        p = run_with(tmp_path, "--rdzv-backend", "consul", "--rdzv-endpoint", endpoint)
        try:
            assert p.wait(80) == 0, p.text
        finally:
            p.kill()
    finally:
        server.kill()
    assert "[rank1]: done 12" in p.text


@pytest.mark.timeout(90)
def test_agent_serves_prometheus_metrics(tmp_path: Path) -> None:
    port = free_port()
    p = run_with(tmp_path, "--metrics-port", str(port), steps="100000")
    try:
        p.wait_for(lambda ln: ln.endswith("]: step 12"), 60)
        deadline, text = time.monotonic() + 20, ""
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if re.search(r"lattice_last_committed_step\{[^}]*\} (\d+)", text):
                break
            time.sleep(0.2)
        values = dict(re.findall(r"^(lattice_\w+)\{[^}]*\} ([\d.e+-]+)$", text, re.M))
        assert float(values["lattice_world_size"]) == 1 and float(values["lattice_round"]) == 0
        assert float(values["lattice_last_committed_step"]) >= 5
        assert float(values["lattice_restarts"]) == 0
        assert float(values["lattice_checkpoint_persist_seconds"]) > 0
    finally:
        p.kill()
