"""Fixtures for the KV-store tests: real servers on free loopback ports.

``kv_case`` runs each contract test against every backend: the ``embedded``
factory (in-process server over real HTTP), the ``consul`` backend against a
separately started embedded server, and ``etcd`` against a real etcd started
from Debian's ``etcd-server`` binary. Without etcd the etcd case is skipped,
unless ``CI`` is set, where a missing etcd is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kv_support import KVCase, free_port, in_ci
from rdzv_support import RdzvEnv

from lattice.runtime.kv import KVStore, create_backend
from lattice.runtime.kv.server import ServerHandle, start_server


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    """An embedded server accepting 0.5 s session TTLs."""
    handle = start_server("127.0.0.1", 0, min_session_ttl=0.5)
    yield handle
    handle.stop()


def _start_etcd(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    client, peer = free_port(), free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    args = [
        "etcd", "--name", "lattice-test", "--data-dir", str(root / "data"),
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"lattice-test={peer_url}", "--logger", "zap", "--log-level", "warn",
    ]
    log = open(root / "etcd.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc, url


def _etcd_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if b'"true"' in resp.read():
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real single-node etcd, started once for the session."""
    if shutil.which("etcd") is None:
        if in_ci():
            pytest.fail("etcd binary not found and CI is set: install etcd-server")
        pytest.skip("etcd binary not found (apt-get install -y etcd-server); CI is not set")
    for attempt in range(3):
        root = tmp_path_factory.mktemp(f"etcd{attempt}")
        proc, url = _start_etcd(root)
        if _etcd_ready(proc, url, timeout=20):
            break
        _stop(proc)
    else:
        pytest.fail(f"etcd did not become healthy; log:\n{(root / 'etcd.log').read_text()}")
    yield url
    _stop(proc)


@pytest.fixture(params=["embedded", "consul", "etcd"])
def kv_case(request: pytest.FixtureRequest) -> Iterator[KVCase]:
    """Each backend in turn, connected to a real server."""
    if request.param == "embedded":
        case = KVCase("embedded", create_backend("embedded", min_session_ttl=0.5), 0.5, 1.5)
    elif request.param == "consul":
        handle = request.getfixturevalue("server")
        case = KVCase("consul", create_backend("consul", url=handle.url), 0.5, 1.5)
    else:
        url = request.getfixturevalue("etcd_url")
        case = KVCase("etcd", create_backend("etcd", url=url), 2.0, 3.0)
    yield case
    case.kv.close()


@pytest.fixture
def kv(kv_case: KVCase) -> KVStore:
    return kv_case.kv


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix, so tests sharing one etcd never see each other's keys."""
    return f"t/{uuid.uuid4().hex[:12]}/"


@pytest.fixture(params=["embedded", "etcd"])
def rdzv_env(request: pytest.FixtureRequest) -> Iterator[RdzvEnv]:
    """A real store for rendezvous tests: an embedded server (1 s TTLs) or the session's etcd (2 s).

    Each test gets its own job name; every store made through ``env.store()`` is closed after it.
    """
    if request.param == "embedded":
        handle = start_server("127.0.0.1", 0, min_session_ttl=0.5)
        env = RdzvEnv("embedded", "consul", handle.url, 1.0, 2.0, handle)
    else:
        env = RdzvEnv("etcd", "etcd", request.getfixturevalue("etcd_url"), 2.0, 2.0)
    yield env
    env.close()
    if env.server is not None:
        env.server.stop()
