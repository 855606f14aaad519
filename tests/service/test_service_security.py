"""Security of the checkpoint service: bearer token, name validation, size limit, job isolation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support import Client, ServiceProc, manifest_of

from lattice.runtime.service import names

pytestmark = pytest.mark.timeout(60)

ROUTES = [("GET", "/v1/jobs"), ("GET", "/v1/jobs/j/checkpoints"),
          ("PUT", "/v1/jobs/j/checkpoints/1/files/x.bin"), ("GET", "/v1/jobs/j/checkpoints/1/files/x.bin"),
          ("PUT", "/v1/jobs/j/checkpoints/1/manifest"), ("GET", "/v1/jobs/j/checkpoints/1/manifest"),
          ("DELETE", "/v1/jobs/j/checkpoints/1"), ("GET", "/v1/jobs/%2e%2e/checkpoints")]


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    """One service for the many read-only cases of this module."""
    work = tmp_path_factory.mktemp("shared")
    svc = ServiceProc(work / "root", work).start()
    yield svc
    svc.kill()


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Bearer ", "Basic dGVzdA==", "Bearer test-token"])
def test_every_route_but_health_needs_the_token(shared_service: ServiceProc, auth: str | None) -> None:
    c = Client(shared_service.port, "")
    headers = {"Authorization": auth} if auth is not None else {}
    for method, path in ROUTES:
        reply = c.request(method, path, b"x" if method == "PUT" else None,
                          {**headers, "X-Lattice-Crc32c": "00000000"})
        assert reply.status == 401, (method, path, reply)
        assert "token" in reply.json()["error"]
    assert c.get("/v1/health").json() == {"status": "ok"}


@pytest.mark.parametrize("path", [
    "/v1/jobs/../checkpoints",
    "/v1/jobs/%2e%2e/checkpoints",
    "/v1/jobs/%2E%2E/checkpoints",
    "/v1/jobs/j/checkpoints/1/files/..",
    "/v1/jobs/j/checkpoints/1/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/jobs/j/checkpoints/1/files/%2Fetc%2Fpasswd",
    "/v1/jobs/%2Ftmp/checkpoints",
    "/v1/jobs//checkpoints",
    "/v1/jobs/.hidden/checkpoints",
    "/v1/jobs/j/checkpoints/1/files/.hidden",
    "/v1/jobs/j/checkpoints/1/files/.upload-0000000001-abc",
    "/v1/jobs/a..b/checkpoints",
    "/v1/jobs/j%00/checkpoints",
    "/v1/jobs/j/checkpoints/-1/manifest",
    "/v1/jobs/j/checkpoints/12345678901/manifest",
    "/v1/jobs/j/checkpoints/1/files/manifest.json",
    "/v1/jobs/j/checkpoints/1/files/a%5Cb",
    "/v1/jobs/..%2F..%2Fetc/checkpoints/1",
    "/v1/jobs/j/checkpoints/%2e%2e",
])
def test_traversal_absolute_and_hidden_names_get_400_with_a_reason(shared_service: ServiceProc,
                                                                   path: str) -> None:
    service = shared_service
    c = service.client()
    methods = ("GET", "PUT") if "/files/" in path or path.endswith("/manifest") else ("GET",)
    if "/checkpoints/" in path and path.count("/") == 5:
        methods = ("DELETE",)
    for method in methods:
        reply = c.request(method, path, b"" if method == "PUT" else None, {"X-Lattice-Crc32c": "00000000"})
        assert reply.status == 400, (method, path, reply)
        assert reply.json()["error"]
    assert [p.name for p in service.root.iterdir()] == [".lattice-service.lock"]  # nothing created


def test_name_rules_unit() -> None:
    assert names.check_job("job-1.run_2") == "job-1.run_2"
    assert names.check_step("0000000042") == 42
    for bad in ("", ".", "..", "a/b", "/abs", ".h", "a..b", "x" * 129, "é"):
        with pytest.raises(names.NameError_):
            names.check_job(bad)
    with pytest.raises(names.NameError_, match="reserved"):
        names.check_file("manifest.json")
    assert names.check_file("manifest.json", allow_manifest=True)
    with pytest.raises(names.NameError_, match="hidden"):
        names.check_file(".x")


def test_file_over_the_limit_gets_413_and_nothing_is_kept(service: ServiceProc) -> None:
    c = service.client()
    big = b"z" * (8 * 1024 * 1024 + 1)  # the fixture's limit is 8M
    reply = c.put_file("j", 1, "big.bin", big)
    assert reply.status == 413 and "--max-file-size" in reply.json()["error"]
    ok = c.put_file("j", 1, "ok.bin", big[:-1])  # exactly the limit is fine
    assert ok.status == 201
    assert not list((service.root / "j").glob(".part-*"))
    too_big_manifest = c.request("PUT", "/v1/jobs/j/checkpoints/1/manifest", b" " * (17 << 20))
    assert too_big_manifest.status == 413


def test_jobs_are_isolated(service: ServiceProc, tmp_path: Path) -> None:
    c = service.client()
    secret = b"job b's weights"
    assert c.put_file("b", 1, "w.bin", secret).status == 201
    assert c.put_manifest("b", 1, manifest_of({"w.bin": secret}, 1)).status == 201
    # job a cannot commit with b's uploads, read b's files, or delete b's checkpoints
    assert c.put_file("b", 2, "w.bin", secret).status == 201
    assert c.put_manifest("a", 2, manifest_of({"w.bin": secret}, 2)).json()["missing"] == ["w.bin"]
    for path in ("/v1/jobs/a/checkpoints/1/files/w.bin", "/v1/jobs/a/checkpoints/1/manifest",
                 "/v1/jobs/a/checkpoints/1/files/..%2Fb%2Fstep-0000000001%2Fw.bin"):
        assert c.get(path).status in (400, 404), path
    assert c.request("DELETE", "/v1/jobs/a/checkpoints/1").status == 404
    assert c.get("/v1/jobs/a/checkpoints").json() == {"checkpoints": []}
    assert c.get("/v1/jobs/b/checkpoints/1/files/w.bin").body == secret
    # a symlink planted in a job's committed checkpoint is not followed out of the root
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"host secret")
    step_dir = service.root / "a" / "step-0000000001"
    assert c.put_file("a", 1, "x.bin", b"x").status == 201
    assert c.put_manifest("a", 1, manifest_of({"x.bin": b"x"}, 1)).status == 201
    os.symlink(outside, step_dir / "leak.bin")
    os.symlink(service.root / "b" / "step-0000000001" / "w.bin", step_dir / "other.bin")
    for name in ("leak.bin", "other.bin"):  # listed in no manifest, and resolving outside job a
        assert c.get(f"/v1/jobs/a/checkpoints/1/files/{name}").status == 404
    # even a manifest naming it does not make a link out of the job's directory servable
    os.rename(step_dir / "other.bin", step_dir / "x.bin")
    assert c.get("/v1/jobs/a/checkpoints/1/files/x.bin").status == 404


def test_second_service_on_the_same_root_is_refused(service: ServiceProc, start_service) -> None:
    with pytest.raises(RuntimeError, match="in use by another checkpoint service"):
        start_service(root=service.root)


def test_serve_refuses_an_empty_or_missing_token_file(tmp_path: Path, run_python) -> None:
    (tmp_path / "empty").write_text("  \n")
    for token_file, message in ((tmp_path / "empty", "is empty"), (tmp_path / "nope", "cannot be read")):
        res = run_python(["-m", "lattice.cli", "checkpoint-service", "serve", "--root", str(tmp_path / "r"),
                          "--port", "0", "--token-file", str(token_file)], timeout=30)
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_max_file_size_accepts_units() -> None:
    import argparse

    from lattice.runtime.service.cli import parse_size

    assert parse_size("1048576") == 1 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("512MiB") == 512 << 20
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("ten")
