"""The service's disk fills up: an upload that does not fit gets 507 with a message saying so,
nothing of it is kept, and the service goes on serving (a small upload and its commit work).

The root is a private 4 MiB tmpfs (``unshare -rm``: a user and mount namespace, no privileges
needed where the kernel allows user namespaces; skipped elsewhere)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from service_support import ServiceProc, manifest_of

pytestmark = pytest.mark.timeout(60)


def can_unshare_mount(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    (tmp / "probe").mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp / 'probe'}"],
                       capture_output=True, timeout=10)
    return r.returncode == 0


def test_a_full_disk_answers_507_keeps_nothing_and_the_service_goes_on(tmp_path: Path) -> None:
    if not can_unshare_mount(tmp_path):
        pytest.skip("user namespaces are not available here (unshare -rm cannot mount a tmpfs)")
    root = tmp_path / "root"
    root.mkdir()
    svc = ServiceProc(root, tmp_path, wrap=["unshare", "-rm", "sh", "-c",
                                            'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"', str(root)])
    svc.start()
    try:
        c = svc.client()
        big = os.urandom(6 << 20)
        r = c.put_file("job", 1, "data.safetensors", big)
        assert r.status == 507, (r.status, r.body)
        assert "disk is full" in r.json()["error"]
        assert "is full" in svc.logs()
        small = os.urandom(1024)
        assert c.put_file("job", 2, "data.safetensors", small).status == 201  # the failed part was removed
        assert c.put_manifest("job", 2, manifest_of({"data.safetensors": small}, 2)).status == 201
        assert c.get("/v1/jobs/job/checkpoints/2/files/data.safetensors").body == small
        assert [cp["step"] for cp in c.get("/v1/jobs/job/checkpoints").json()["checkpoints"]] == [2]
    finally:
        svc.kill()
