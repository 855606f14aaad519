"""The service's disk fills up: an upload that does not fit gets 507 with a message saying so,
nothing of it is kept, and the service goes on serving (a small upload and its commit work).

The root is a private 4 MiB tmpfs (``unshare -rm``: a user and mount namespace, no privileges
needed where the kernel allows user namespaces; skipped elsewhere)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from service_support import ServiceProc, manifest_of
from userns import can_mount_tmpfs

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif(not can_mount_tmpfs(), reason="user namespaces are not available here (unshare -rm cannot mount a tmpfs)")
def test_a_full_disk_answers_507_keeps_nothing_and_the_service_goes_on(
        tmp_path: Path, start_service: Callable[..., ServiceProc]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    svc = start_service(root=root, wrap=["unshare", "-rm", "sh", "-c",
                                         'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"', str(root)])
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
