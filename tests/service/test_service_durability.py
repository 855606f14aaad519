"""Durability: a SIGKILLed service loses nothing committed, never serves a half-written
checkpoint, and cleans the leftovers when it starts again; SIGTERM stops it gracefully."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import crc32c
import pytest
from service_support import REPO, TOKEN, ServiceProc, make_checkpoint

pytestmark = pytest.mark.timeout(90)


def _hidden(root: Path, job: str) -> list[str]:
    if not (root / job).is_dir():
        return []
    return sorted(p.name for p in (root / job).iterdir() if p.name.startswith("."))


def _verify(root: Path, job: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lattice.cli", "ckpt", "verify", str(root / job)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def _start_partial_upload(port: int, path: str, total: int, sent: int) -> socket.socket:
    """Send the headers and the first ``sent`` of ``total`` body bytes, then leave it hanging."""
    body = random.Random(1).randbytes(total)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {total}\r\nX-Lattice-Crc32c: {crc32c.crc32c(body):08x}\r\n\r\n")
    sock.sendall(head.encode() + body[:sent])
    return sock


def _wait_for(predicate, timeout: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_sigkill_during_upload_loses_nothing_committed(start_service, tmp_path: Path) -> None:
    svc: ServiceProc = start_service()
    c = svc.client()
    ckpt = make_checkpoint(tmp_path / "local")
    assert c.upload_dir("j", 1, ckpt).status == 201
    committed = {n: c.get(f"/v1/jobs/j/checkpoints/1/files/{n}").body for n in ("data.safetensors", "tree.json")}
    # step 2: one file fully uploaded (pending), another half sent when the service dies
    assert c.put_file("j", 2, "tree.json", (ckpt / "tree.json").read_bytes()).status == 201
    sock = _start_partial_upload(svc.port, "/v1/jobs/j/checkpoints/2/files/data.safetensors",
                                 total=12 << 20, sent=9 << 20)
    try:
        _wait_for(lambda: any(p.name.startswith(".part-") and p.stat().st_size > 0
                              for p in (svc.root / "j").iterdir()))
        hidden = _hidden(svc.root, "j")
        assert any(h.startswith(".upload-0000000002") for h in hidden), hidden
        assert svc.kill(signal.SIGKILL) == -signal.SIGKILL
    finally:
        sock.close()
    assert _hidden(svc.root, "j")  # the leftovers are there before the restart...
    svc.start()
    assert _hidden(svc.root, "j") == []  # ...and gone after it
    assert "removed leftover" in svc.logs()
    c = svc.client()
    assert c.steps("j") == [1]
    assert c.get("/v1/jobs/j/checkpoints/2/manifest").status == 404
    assert c.get("/v1/jobs/j/checkpoints/2/files/tree.json").status == 404
    for name, body in committed.items():
        assert c.get(f"/v1/jobs/j/checkpoints/1/files/{name}").body == body
    # the pending upload died with the process: a manifest now finds its files missing
    manifest = c.get("/v1/jobs/j/checkpoints/1/manifest").body.replace(b'"step": 1', b'"step": 2')
    assert c.put_manifest("j", 2, manifest).status in (400, 409)
    verify = _verify(svc.root, "j")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sigkill_at_a_random_moment_of_many_commits(start_service, tmp_path: Path) -> None:
    """Every step answered 201 survives; every listed step verifies; nothing half-written shows."""
    svc: ServiceProc = start_service()
    ckpt = make_checkpoint(tmp_path / "local", nbytes=1 << 20)
    acked: list[int] = []
    attempted: list[int] = []

    def writer() -> None:
        c = svc.client()
        for step in range(1, 10_000):
            attempted.append(step)
            try:
                if c.upload_dir("j", step, ckpt).status == 201:
                    acked.append(step)
            except (OSError, AssertionError):
                return

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    _wait_for(lambda: len(acked) >= 2, timeout=30)
    time.sleep(random.uniform(0.0, 0.5))
    svc.kill(signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive()
    svc.start()
    listed = svc.client().steps("j")
    assert set(acked) <= set(listed) <= set(attempted), (acked, listed, attempted[-3:])
    verify = _verify(svc.root, "j")
    assert verify.returncode == 0 and f"{len(listed)} ok, 0 damaged" in verify.stdout, verify.stdout
    assert _hidden(svc.root, "j") == []


def test_sigterm_finishes_gracefully_and_drops_uncommitted_uploads(start_service) -> None:
    svc: ServiceProc = start_service()
    c = svc.client()
    assert c.put_file("j", 1, "x.bin", b"x").status == 201
    from service_support import manifest_of

    assert c.put_manifest("j", 1, manifest_of({"x.bin": b"x"}, 1)).status == 201
    assert c.put_file("j", 2, "x.bin", b"y").status == 201
    assert _hidden(svc.root, "j")
    assert svc.kill(signal.SIGTERM) == 0
    assert _hidden(svc.root, "j") == []
    assert sorted(p.name for p in (svc.root / "j").iterdir()) == ["latest", "step-0000000001"]
    logs = svc.logs()
    assert "committed job j step 1" in logs and "checkpoint service stopped" in logs


def test_client_that_hangs_up_mid_upload_leaves_nothing(service: ServiceProc) -> None:
    sock = _start_partial_upload(service.port, "/v1/jobs/j/checkpoints/1/files/x.bin",
                                 total=7 << 20, sent=5 << 20)  # under the 8M limit
    _wait_for(lambda: any(h.startswith(".part-") for h in _hidden(service.root, "j")))
    sock.close()
    _wait_for(lambda: _hidden(service.root, "j") == [])
    c = service.client()
    assert c.get("/v1/health").status == 200
    assert c.put_manifest("j", 1, b"{}").status == 400
    assert "internal error" not in service.logs() and "Traceback" not in service.logs()


def test_abandoned_upload_is_deleted_after_the_timeout(start_service) -> None:
    from service_support import manifest_of

    svc: ServiceProc = start_service(extra=["--abandon-after", "1"])
    c = svc.client()
    assert c.put_file("j", 1, "x.bin", b"x").status == 201
    assert c.put_file("j", 2, "x.bin", b"x").status == 201
    assert len(_hidden(svc.root, "j")) == 2
    _wait_for(lambda: _hidden(svc.root, "j") == [], timeout=10)
    assert c.put_manifest("j", 1, manifest_of({"x.bin": b"x"}, 1)).json()["missing"] == ["x.bin"]
    assert "dropped the upload of job j step 2" in svc.logs()
