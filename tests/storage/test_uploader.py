"""The uploader (stores/uploader.py): files sent from the snapshot buffers while the staging copy
is written, the future resolving at the store's commit, and the failure paths: a send that fails,
a persist that fails after the send, a store that loses the sent files before the commit, a store
that cannot be reached, and ``sent`` entries that do not match the manifest."""

from __future__ import annotations

import errno
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import crc32c
import numpy as np
import pytest
from storage_support import make_checkpoint

from lattice.core import fmt, persist
from lattice.core.errors import CheckpointError
from lattice.core.stores import open_store, transfer
from lattice.core.stores.fsspec_store import FsspecStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    u = f"memory://uploader-{uuid.uuid4().hex[:10]}/job"
    yield u
    store = open_store(u)
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def objects(url: str) -> list[str]:
    store = open_store(url)
    return sorted(store._objects()) if store.fs.exists(store.root) else []


def sent_then(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None] = lambda: None) -> list[tuple[str, str]]:
    """Hold the staging write of the data file until the store has it from memory, then run
    ``action``; returns (file name, type of source) of every ``put_file``, as they happen. The
    hold proves the overlap: code that sent only after the staging copy would time out here."""
    in_store, sources = threading.Event(), []
    real_put, real_write = FsspecStore.put_file, persist.write_file

    def put(self: FsspecStore, step: int, name: str, source: object, size: int, crc: int) -> None:
        sources.append((name, type(source).__name__))
        real_put(self, step, name, source, size, crc)
        if isinstance(source, memoryview) and name.endswith(".safetensors"):
            in_store.set()

    def write(path: Path, parts: list) -> dict[str, int]:  # noqa: ANN001
        if path.name.endswith(".safetensors"):  # the staging copy of the data file
            assert in_store.wait(20), "the data file was not sent before its staging copy was written"
            action()
        return real_write(path, parts)

    monkeypatch.setattr(FsspecStore, "put_file", put)
    monkeypatch.setattr(persist, "write_file", write)
    return sources


def checkpoint_once(make_session, url: str, a: np.ndarray) -> None:  # noqa: ANN001
    s = make_session(checkpoint_dir=url, every_steps=None, keep=1)
    s.register({"a": a})
    s.step_done()
    s.checkpoint()
    s.wait()


def restored(make_session, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, np.ndarray]:  # noqa: ANN001
    """A fresh session's restore from the store (a new staging directory: nothing local to take)."""
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / f"fresh-{uuid.uuid4().hex[:6]}"))
    b = np.zeros(1000)
    r = make_session(checkpoint_dir=url, every_steps=None)
    r.register({"a": b})
    return r.step, b


def test_files_go_to_the_store_from_memory_while_the_staging_copy_is_written(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    sources = sent_then(monkeypatch)
    a = np.arange(1000.0)
    checkpoint_once(make_session, url, a)
    assert {kind for _, kind in sources} == {"memoryview"}  # nothing was uploaded again from staging
    got = transfer.download(open_store(url), 1, tmp_path / "check")
    staged = tmp_path / "stage" / fmt.step_dirname(1)
    for name in [fmt.MANIFEST, *fmt.parse_manifest((got / fmt.MANIFEST).read_bytes())["files"]]:
        assert (got / name).read_bytes() == (staged / name).read_bytes()
    step, b = restored(make_session, url, tmp_path, monkeypatch)
    assert step == 1 and np.array_equal(a, b)


def test_a_failed_send_from_memory_falls_back_to_the_staged_copy(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    real_put, sources = FsspecStore.put_file, []

    def put(self: FsspecStore, step: int, name: str, source: object, size: int, crc: int) -> None:
        sources.append((name, type(source).__name__))
        if isinstance(source, memoryview) and name.endswith(".safetensors"):
            raise transfer.TransientStoreError("connection reset (injected)")
        real_put(self, step, name, source, size, crc)

    monkeypatch.setattr(FsspecStore, "put_file", put)
    a = np.arange(1000.0)
    checkpoint_once(make_session, url, a)
    assert open_store(url).list_committed() == [1]
    data = [kind for name, kind in sources if name.endswith(".safetensors")]
    assert data == ["memoryview", "PosixPath"]  # the staged copy replaced the failed send
    step, b = restored(make_session, url, tmp_path, monkeypatch)
    assert step == 1 and np.array_equal(a, b)


def test_the_checkpoint_is_done_once_committed_in_the_store_and_wait_covers_retention(
        url: str, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    """As with a local directory: the future resolves at the store's commit; deleting the steps
    that ``keep`` drops follows on the upload thread, and ``wait()`` returns only after it."""
    release, retaining = threading.Event(), threading.Event()
    real = FsspecStore.retain

    def slow_retain(self: FsspecStore, keep: int, newest: int | None = None) -> list[int]:
        retaining.set()
        assert release.wait(20)
        return real(self, keep, newest)

    monkeypatch.setattr(FsspecStore, "retain", slow_retain)
    release.set()
    s = make_session(checkpoint_dir=url, every_steps=None, keep=1)
    s.register({"a": np.zeros(10)})
    s.step_done()
    s.checkpoint()
    s.wait()  # step 1: nothing to delete, but retention ran
    release.clear()
    retaining.clear()
    s.step_done()
    future = s.checkpoint()
    assert future is not None
    future.result(timeout=20)  # resolves while retention is held back
    assert retaining.wait(20) and open_store(url).list_committed() == [2, 1]
    waiter = threading.Thread(target=s.wait)
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # wait() covers the retention
    release.set()
    waiter.join(20)
    assert not waiter.is_alive() and open_store(url).list_committed() == [2]


def test_a_persist_that_fails_after_the_send_leaves_nothing_in_the_store(
        url: str, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    sent_then(monkeypatch, disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        checkpoint_once(make_session, url, np.arange(1000.0))
    assert open_store(url).list_committed() == []
    assert objects(url) == []  # the files sent from memory were removed again


def test_files_the_store_lost_before_the_commit_are_uploaded_again_from_staging(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        make_session) -> None:  # noqa: ANN001
    """A service restart drops uploads in progress: the commit names them missing, and the staged
    copy is uploaded in full instead of the checkpoint failing."""
    def service_restarted() -> None:
        store = open_store(url)
        store.fs.rm(f"{store.root}/{fmt.step_dirname(1)}", recursive=True)

    sent_then(monkeypatch, service_restarted)
    caplog.set_level(logging.WARNING, logger="lattice")
    a = np.arange(1000.0)
    checkpoint_once(make_session, url, a)
    assert open_store(url).list_committed() == [1]
    assert any("uploading every file from the staged copy" in r.getMessage() for r in caplog.records)
    step, b = restored(make_session, url, tmp_path, monkeypatch)
    assert step == 1 and np.array_equal(a, b)


def test_an_unreachable_store_fails_the_checkpoint_after_one_round_of_retries(
        url: str, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    calls = []

    def down(self: FsspecStore) -> list[int]:
        calls.append(1)
        raise transfer.TransientStoreError("connection refused (injected)")

    monkeypatch.setattr(transfer, "BACKOFF", 0.001)
    s = make_session(checkpoint_dir=url, every_steps=None, keep=1)
    s.register({"a": np.arange(10.0)})
    monkeypatch.setattr(FsspecStore, "list_committed", down)
    s.step_done()
    s.checkpoint()
    with pytest.raises(CheckpointError, match="connection refused"):
        s.wait()
    assert len(calls) == transfer.RETRIES + 1  # not a second full round after the staging commit
    assert (s.location.local / fmt.step_dirname(1) / fmt.MANIFEST).is_file()  # the local commit stands


def test_sent_entries_that_differ_from_the_manifest_are_put_again(url: str, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "src", 3)
    info = fmt.parse_manifest((local / fmt.MANIFEST).read_bytes())["files"]
    store = open_store(url)
    put: list[str] = []
    real = store.put_file
    store.put_file = lambda step, name, *rest: (put.append(name), real(step, name, *rest))[1]  # type: ignore[method-assign]
    real(3, fmt.TREE, local / fmt.TREE, info[fmt.TREE]["size"], info[fmt.TREE]["crc32c"])
    real(3, fmt.DATA, memoryview(b"stale"), 5, crc32c.crc32c(b"stale"))  # what an earlier attempt left
    sent = {fmt.TREE: (info[fmt.TREE]["size"], info[fmt.TREE]["crc32c"]),
            fmt.DATA: (info[fmt.DATA]["size"], info[fmt.DATA]["crc32c"] ^ 1)}
    transfer.upload(local, store, 3, sent=sent)
    assert put == [fmt.DATA] and store.list_committed() == [3]
    got = transfer.download(store, 3, tmp_path / "dst")
    assert (got / fmt.DATA).read_bytes() == (local / fmt.DATA).read_bytes()
