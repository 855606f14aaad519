"""The checkpoint service's API over real HTTP: upload, commit, list, download, delete, retention."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path

import crc32c
import numpy as np
import pytest
from service_support import REPO, TOKEN, ServiceProc, make_checkpoint, manifest_for, manifest_of

import lattice
from lattice.core import fmt

pytestmark = pytest.mark.timeout(60)


def test_commit_lists_serves_and_verifies_with_lattice_ckpt(service: ServiceProc, tmp_path: Path) -> None:
    c = service.client()
    ckpt = make_checkpoint(tmp_path / "local")
    assert c.upload_dir("job-a", 7, ckpt).status == 201
    listed = c.get("/v1/jobs/job-a/checkpoints").json()["checkpoints"]
    files = fmt.parse_manifest(manifest_for(ckpt, 7))["files"]
    assert listed == [{"step": 7, "size": sum(f["size"] for f in files.values()), "files": 2,
                       "wall_time": listed[0]["wall_time"]}]
    assert c.get("/v1/jobs").json() == {"jobs": ["job-a"]}
    for name in files:
        got = c.get(f"/v1/jobs/job-a/checkpoints/7/files/{name}")
        assert got.status == 200 and got.body == (ckpt / name).read_bytes()
        assert got.headers["x-lattice-crc32c"] == f"{files[name]['crc32c']:08x}"
    assert c.get("/v1/jobs/job-a/checkpoints/7/manifest").body == manifest_for(ckpt, 7)
    # the committed directory is an ordinary Lattice checkpoint root
    verify = subprocess.run([sys.executable, "-m", "lattice.cli", "ckpt", "verify", str(service.root / "job-a")],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert verify.returncode == 0 and "step 7: ok" in verify.stdout, verify.stdout + verify.stderr
    assert (service.root / "job-a" / "latest").read_text().strip() == "step-0000000007"
    s = lattice.new_session(checkpoint_dir=str(service.root / "job-a"), every_steps=None)
    try:
        state = s.register({"w": np.zeros((1 << 16) // 8)})
        assert state.step == 7
        np.testing.assert_array_equal(state.w, np.random.default_rng(0).standard_normal((1 << 16) // 8))
    finally:
        s.close()


def test_range_download_returns_206_with_the_slice(service: ServiceProc) -> None:
    c = service.client()
    data = bytes(range(256)) * 64
    assert c.put_file("j", 1, "blob.bin", data).status == 201
    assert c.put_manifest("j", 1, manifest_of({"blob.bin": data}, 1)).status == 201
    part = c.get("/v1/jobs/j/checkpoints/1/files/blob.bin", {"Range": "bytes=100-1099"})
    assert part.status == 206 and part.body == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    tail = c.get("/v1/jobs/j/checkpoints/1/files/blob.bin", {"Range": "bytes=-10"})
    assert tail.status == 206 and tail.body == data[-10:]
    assert c.get("/v1/jobs/j/checkpoints/1/files/blob.bin", {"Range": "bytes=99999-"}).status == 416


def test_manifest_before_its_files_is_refused_with_the_missing_ones(service: ServiceProc) -> None:
    c = service.client()
    files = {"a.bin": b"a" * 100, "b.bin": b"b" * 200}
    assert c.put_file("j", 3, "a.bin", files["a.bin"]).status == 201
    reply = c.put_manifest("j", 3, manifest_of(files, 3))
    assert reply.status == 409 and reply.json()["missing"] == ["b.bin"] and reply.json()["mismatch"] == []
    assert c.steps("j") == []
    assert c.get("/v1/jobs/j/checkpoints/3/manifest").status == 404
    assert c.get("/v1/jobs/j/checkpoints/3/files/a.bin").status == 404
    assert c.put_file("j", 3, "b.bin", b"X" * 200).status == 201  # other bytes than the manifest says
    reply = c.put_manifest("j", 3, manifest_of(files, 3))
    assert reply.status == 409 and reply.json()["mismatch"] == ["b.bin"]
    assert c.put_file("j", 3, "b.bin", files["b.bin"]).status == 201  # a re-upload replaces it
    assert c.put_manifest("j", 3, manifest_of(files, 3)).status == 201
    assert c.steps("j") == [3]


def test_upload_with_wrong_checksum_is_discarded(service: ServiceProc) -> None:
    c = service.client()
    data = b"payload" * 1000
    reply = c.put_file("j", 1, "x.bin", data, crc=crc32c.crc32c(data) ^ 1)
    assert reply.status == 400 and "crc32c" in reply.json()["error"]
    assert c.put_manifest("j", 1, manifest_of({"x.bin": data}, 1)).json()["missing"] == ["x.bin"]
    assert not [p for p in (service.root / "j").rglob("*") if p.is_file()]  # nothing kept on disk


def test_missing_headers_are_refused(service: ServiceProc) -> None:
    c = service.client()
    reply = c.request("PUT", "/v1/jobs/j/checkpoints/1/files/x", b"abc")
    assert reply.status == 400 and "X-Lattice-Crc32c" in reply.json()["error"]
    reply = c.request("PUT", "/v1/jobs/j/checkpoints/1/files/x", b"abc", {"X-Lattice-Crc32c": "ABCDEF01"})
    assert reply.status == 400  # upper-case hex is not the contract's form
    chunked = c.request("PUT", "/v1/jobs/j/checkpoints/1/files/x", iter([b"abc"]),
                        {"X-Lattice-Crc32c": f"{crc32c.crc32c(b'abc'):08x}", "Transfer-Encoding": "chunked"})
    assert chunked.status == 411 and "Content-Length" in chunked.json()["error"]


def test_committed_step_cannot_be_overwritten(service: ServiceProc) -> None:
    c = service.client()
    files = {"x.bin": b"1" * 10}
    assert c.put_file("j", 1, "x.bin", files["x.bin"]).status == 201
    assert c.put_manifest("j", 1, manifest_of(files, 1)).status == 201
    assert c.put_file("j", 1, "x.bin", b"2" * 10).status == 409
    assert c.put_manifest("j", 1, manifest_of(files, 1)).status == 409
    assert c.get("/v1/jobs/j/checkpoints/1/files/x.bin").body == files["x.bin"]


def test_bad_manifests_get_400(service: ServiceProc) -> None:
    c = service.client()
    good = manifest_of({}, 2)
    assert c.put_manifest("j", 1, good).status == 400  # step 2 in the body, 1 in the URL
    assert c.put_manifest("j", 2, good.replace(b'"version": 1', b'"version": 2')).status == 400
    assert c.put_manifest("j", 2, b"not json").status == 400
    assert c.put_manifest("j", 2, b"[" * 100000).status == 400
    assert c.put_manifest("j", 2, good[:-1] + b"0}").status == 400  # its own crc no longer matches
    traversal = fmt.manifest(2, 0.0, {"../x": {"size": 0, "crc32c": 0}}, {})
    assert c.put_manifest("j", 2, traversal).status == 400
    assert c.put_manifest("j", 2, good, keep=0).status == 400
    assert c.request("PUT", "/v1/jobs/j/checkpoints/2/manifest?keep=x", good).status == 400
    assert c.steps("j") == []


def test_delete_committed_and_pending(service: ServiceProc) -> None:
    c = service.client()
    for step in (1, 2):
        assert c.put_file("j", step, "x.bin", b"x").status == 201
        assert c.put_manifest("j", step, manifest_of({"x.bin": b"x"}, step)).status == 201
    assert c.request("DELETE", "/v1/jobs/j/checkpoints/2").status == 204
    assert c.steps("j") == [1]
    assert (service.root / "j" / "latest").read_text().strip() == "step-0000000001"
    assert c.get("/v1/jobs/j/checkpoints/2/files/x.bin").status == 404
    assert c.request("DELETE", "/v1/jobs/j/checkpoints/2").status == 404
    assert c.put_file("j", 5, "x.bin", b"x").status == 201  # pending only
    assert c.request("DELETE", "/v1/jobs/j/checkpoints/5").status == 204
    assert c.put_manifest("j", 5, manifest_of({"x.bin": b"x"}, 5)).json()["missing"] == ["x.bin"]
    assert c.request("DELETE", "/v1/jobs/nojob/checkpoints/1").status == 404


def test_keep_deletes_all_but_the_newest(service: ServiceProc) -> None:
    c = service.client()
    for step in (10, 20, 30, 40):
        assert c.put_file("j", step, "x.bin", b"x").status == 201
        reply = c.put_manifest("j", step, manifest_of({"x.bin": b"x"}, step), keep=2)
        assert reply.status == 201
    assert reply.json()["deleted"] == [20]
    assert c.steps("j") == [40, 30]
    assert sorted(p.name for p in (service.root / "j").iterdir()) == \
        ["latest", "step-0000000030", "step-0000000040"]


def test_errors_are_json_for_unknown_routes_and_methods(service: ServiceProc) -> None:
    c = service.client()
    nf = c.get("/v1/nothing")
    assert nf.status == 404 and "error" in nf.json()
    na = c.request("POST", "/v1/jobs")
    assert na.status == 405 and "error" in json.loads(na.body)
    assert c.get("/v1/jobs/j/checkpoints").json() == {"checkpoints": []}


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_large_file_is_streamed_never_held_in_memory(start_service) -> None:
    """A 192 MiB upload and download raise the service's peak memory by far less than the file."""
    svc: ServiceProc = start_service(max_file_size="1G")
    c = svc.client()
    c.put_file("warm", 1, "x", b"x" * (8 << 20))  # let the first blocks allocate their buffers
    assert svc.proc is not None
    before = _peak_rss_mib(svc.proc.pid)
    block, count = np.random.default_rng(0).bytes(1 << 20), 192
    crc = 0
    for _ in range(count):
        crc = crc32c.crc32c(block, crc)
    reply = c.request("PUT", "/v1/jobs/big/checkpoints/1/files/data.bin", (block for _ in range(count)),
                      {"Content-Length": str(count << 20), "X-Lattice-Crc32c": f"{crc:08x}"}, timeout=120)
    assert reply.status == 201, reply
    manifest = fmt.manifest(1, 0.0, {"data.bin": {"size": count << 20, "crc32c": crc}}, {})
    assert c.put_manifest("big", 1, manifest).status == 201
    got = c.get("/v1/jobs/big/checkpoints/1/files/data.bin", {"Range": f"bytes={(count - 1) << 20}-"})
    assert got.body == block
    whole = http_get_crc(svc.port, "/v1/jobs/big/checkpoints/1/files/data.bin")
    assert whole == crc
    grew = _peak_rss_mib(svc.proc.pid) - before
    assert grew < 48, f"peak memory grew by {grew:.0f} MiB for a {count} MiB file"


def http_get_crc(port: int, path: str) -> int:
    """Download ``path`` in 1 MiB reads and return its crc32c (the client holds no more either)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        assert resp.status == 200
        crc = 0
        while chunk := resp.read(1 << 20):
            crc = crc32c.crc32c(chunk, crc)
        return crc
    finally:
        conn.close()
