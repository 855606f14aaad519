"""Fixtures for the storage tests: a real moto S3 server, the real checkpoint service, and one
``backend`` fixture that runs the contract suite against file, memory://, s3:// and lattice://."""

from __future__ import annotations

import importlib.util
import secrets
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from storage_support import Backend, Server, free_port, make_bucket, moto, s3_env

from lattice.core import fmt
from lattice.core.stores import open_store
from lattice.core.stores.base import Store


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One moto server for the session; yields its endpoint URL."""
    port = free_port()
    server = moto(port, log=tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's moto server, with the environment set; yields ``s3://bucket``."""
    for k, v in s3_env(moto_server).items():
        monkeypatch.setenv(k, v)
    return f"s3://{make_bucket(moto_server)}"


def _service_available() -> str | None:
    if importlib.util.find_spec("lattice.runtime.service.server") is None:
        return "helper 'service' has not written lattice/runtime/service/server.py yet"
    if importlib.util.find_spec("lattice.runtime.service.cli") is None:
        return "lattice checkpoint-service serve (lattice/runtime/service/cli.py) does not exist yet"
    return None


@pytest.fixture(scope="session")
def service_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """The real checkpoint service on a free port; yields (address, token, root)."""
    reason = _service_available()
    if reason:
        pytest.skip(f"lattice:// backend skipped: {reason}")
    base = tmp_path_factory.mktemp("service")
    token = secrets.token_hex(16)
    (base / "token").write_text(token)
    (base / "token").chmod(0o600)
    port = free_port()
    argv = [sys.executable, "-m", "lattice.cli", "checkpoint-service", "serve", "--root", str(base / "root"),
            "--host", "127.0.0.1", "--port", str(port), "--token-file", str(base / "token")]
    server = Server(argv, f"http://127.0.0.1:{port}/v1/health", log=base / "service.log").start()
    try:
        yield f"127.0.0.1:{port}", token, base / "root"
    finally:
        server.stop()


def _fsspec_overwrite(store: Store) -> Callable[[int, str, bytes], None]:
    def overwrite(step: int, name: str, data: bytes) -> None:
        store.fs.pipe_file(f"{store.root}/{fmt.step_dirname(step)}/{name}", data)  # type: ignore[attr-defined]
    return overwrite


def _dir_overwrite(root: Path) -> Callable[[int, str, bytes], None]:
    def overwrite(step: int, name: str, data: bytes) -> None:
        (root / fmt.step_dirname(step) / name).write_bytes(data)
    return overwrite


@pytest.fixture(params=["file", "memory", "s3", "lattice"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """Each backend in turn, empty, for the contract suite."""
    kind: str = request.param
    if kind == "file":
        url = (tmp_path / "store").as_uri()
        store = open_store(url)
        yield Backend(kind, url, store, _dir_overwrite(tmp_path / "store"))
    elif kind == "memory":
        url = f"memory://t-{uuid.uuid4().hex[:12]}/job"
        store = open_store(url)
        yield Backend(kind, url, store, _fsspec_overwrite(store))
        if store.fs.exists(store.root):  # type: ignore[attr-defined]
            store.fs.rm(store.root, recursive=True)  # type: ignore[attr-defined]
    elif kind == "s3":
        url = request.getfixturevalue("s3") + "/job"
        store = open_store(url)
        yield Backend(kind, url, store, _fsspec_overwrite(store))
    else:
        address, token, root = request.getfixturevalue("service_server")
        monkeypatch.setenv("LATTICE_SERVICE_TOKEN", token)
        job = f"job-{uuid.uuid4().hex[:10]}"
        url = f"lattice://{address}/{job}"
        yield Backend(kind, url, open_store(url), _dir_overwrite(root / job))


