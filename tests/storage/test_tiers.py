"""Worker side of the memory tier (contract B) and staging behaviour of a URL checkpoint_dir."""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from lattice.core import fmt
from lattice.core.stores import open_store, transfer
from lattice.core.stores.fsspec_store import FsspecStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def url() -> str:
    u = f"memory://tier-{uuid.uuid4().hex[:10]}/job"
    yield u
    store = open_store(u)
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def _checkpoint(make_session, url: str, steps: int, value: float) -> None:  # noqa: ANN001
    s = make_session(checkpoint_dir=url, every_steps=None, restore=False)
    a = np.full(100, value)
    s.register({"a": a})
    for _ in range(steps):
        s.step_done()
    s.checkpoint()
    s.wait()
    s.close()


def test_with_a_memory_dir_the_worker_commits_there_and_uploads_nothing(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    monkeypatch.setenv("LATTICE_MEMORY_DIR", str(tmp_path / "shm"))
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    _checkpoint(make_session, url, 3, 1.0)
    assert (tmp_path / "shm" / fmt.step_dirname(3) / fmt.MANIFEST).is_file()
    assert open_store(url).list_committed() == []
    assert not (tmp_path / "stage").exists()


def test_restore_prefers_memory_and_reads_nothing_from_storage(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    _checkpoint(make_session, url, 5, 5.0)  # storage holds step 5 ...
    monkeypatch.setenv("LATTICE_MEMORY_DIR", str(tmp_path / "shm"))
    _checkpoint(make_session, url, 5, 55.0)  # ... memory holds step 5 too (equal: memory wins)
    _checkpoint(make_session, url, 7, 7.0)  # ... and the newer step 7
    reads: list[str] = []
    for name in ("read_manifest", "open_file", "download"):
        def refuse(self, *a, _n=name):  # noqa: ANN001
            reads.append(_n)
            raise AssertionError(f"storage read: {_n}")
        monkeypatch.setattr(FsspecStore, name, refuse)
    s = make_session(checkpoint_dir=url, every_steps=None)
    a = np.zeros(100)
    s.register({"a": a})
    assert (s.step, a[0], reads) == (7, 7.0, [])
    assert s.restored.path == tmp_path / "shm" / fmt.step_dirname(7)

    (tmp_path / "shm" / fmt.step_dirname(7) / fmt.MANIFEST).unlink()  # only the equal steps remain
    s2 = make_session(checkpoint_dir=url, every_steps=None)
    b = np.zeros(100)
    s2.register({"a": b})
    assert (s2.step, b[0], reads) == (5, 55.0, [])


def test_restore_takes_storage_when_it_is_newer_than_memory(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    _checkpoint(make_session, url, 9, 9.0)
    monkeypatch.setenv("LATTICE_MEMORY_DIR", str(tmp_path / "shm"))
    _checkpoint(make_session, url, 4, 4.0)
    import shutil
    shutil.rmtree(tmp_path / "stage")  # e.g. a new node: storage is the only copy of step 9
    s = make_session(checkpoint_dir=url, every_steps=None)
    a = np.zeros(100)
    s.register({"a": a})
    assert (s.step, a[0]) == (9, 9.0)
    assert s.restored.path == tmp_path / "stage" / fmt.step_dirname(9)  # downloaded, not into memory


def test_restore_falls_back_to_an_older_store_checkpoint_when_the_newest_is_damaged(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    _checkpoint(make_session, url, 1, 1.0)
    _checkpoint(make_session, url, 2, 2.0)
    store = open_store(url)
    path = f"{store.root}/{fmt.step_dirname(2)}/{fmt.DATA}"
    raw = bytearray(store.fs.cat_file(path))
    raw[-1] ^= 0xFF
    store.fs.pipe_file(path, bytes(raw))
    import shutil
    shutil.rmtree(tmp_path / "stage")
    s = make_session(checkpoint_dir=url, every_steps=None)
    a = np.zeros(100)
    s.register({"a": a})
    assert (s.step, a[0]) == (1, 1.0)
    assert store.list_committed() == [2, 1]  # the damaged one is left in the store, not deleted


def test_staging_keeps_uploading_with_retention_on_the_store(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    s = make_session(checkpoint_dir=url, every_steps=2, keep=2, on_busy="wait")
    a = np.zeros(10)
    s.register({"a": a})
    for _ in range(8):
        a += 1
        s.step_done()
    s.wait()
    assert open_store(url).list_committed() == [8, 6]
    transfer.download(open_store(url), 8, tmp_path / "check")


def test_the_checkpoint_is_done_once_committed_in_the_store_and_wait_covers_retention(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    """As with a local directory: the future resolves at the store's commit; deleting the steps
    that ``keep`` drops follows on the upload thread, and ``wait()`` returns only after it."""
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
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


def test_files_go_to_the_store_from_memory_while_the_staging_copy_is_written(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    """The staging write of the data file is held until the store has that file: the upload
    from the snapshot buffer overlaps the staging persist (sequential code would time out)."""
    from lattice.core import persist

    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    in_store, sources = threading.Event(), []
    real_put, real_write = FsspecStore.put_file, persist.write_file

    def put(self: FsspecStore, step: int, name: str, source: object, size: int, crc: int) -> None:
        real_put(self, step, name, source, size, crc)
        sources.append((name, type(source).__name__))
        if name.endswith(".safetensors"):
            in_store.set()

    def write(path: Path, parts: list) -> dict[str, int]:  # noqa: ANN001
        if path.name.endswith(".safetensors"):
            assert in_store.wait(20), "the data file was not sent before its staging copy was written"
        return real_write(path, parts)

    monkeypatch.setattr(FsspecStore, "put_file", put)
    monkeypatch.setattr(persist, "write_file", write)
    s = make_session(checkpoint_dir=url, every_steps=None, keep=1)
    a = np.arange(1000.0)
    s.register({"a": a})
    s.step_done()
    s.checkpoint()
    s.wait()
    assert {kind for _, kind in sources} == {"memoryview"}  # nothing was uploaded twice from staging
    got = transfer.download(open_store(url), 1, tmp_path / "check")
    assert (got / fmt.MANIFEST).read_bytes() == (tmp_path / "stage" / fmt.step_dirname(1) / fmt.MANIFEST).read_bytes()
    for name in fmt.parse_manifest((got / fmt.MANIFEST).read_bytes())["files"]:
        assert (got / name).read_bytes() == (tmp_path / "stage" / fmt.step_dirname(1) / name).read_bytes()


def test_a_failed_send_from_memory_falls_back_to_the_staged_copy(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    from lattice.core.stores.transfer import TransientStoreError

    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    real_put, sources = FsspecStore.put_file, []

    def put(self: FsspecStore, step: int, name: str, source: object, size: int, crc: int) -> None:
        sources.append((name, type(source).__name__))
        if isinstance(source, memoryview) and name.endswith(".safetensors"):
            raise TransientStoreError("connection reset (injected)")
        real_put(self, step, name, source, size, crc)

    monkeypatch.setattr(FsspecStore, "put_file", put)
    s = make_session(checkpoint_dir=url, every_steps=None, keep=1)
    s.register({"a": np.arange(1000.0)})
    s.step_done()
    s.checkpoint()
    s.wait()
    assert open_store(url).list_committed() == [1]
    data = [kind for name, kind in sources if name.endswith(".safetensors")]
    assert data == ["memoryview", "PosixPath"]  # the staged copy replaced the failed send
    s.close()
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "fresh"))  # so the restore downloads from the store
    b = np.zeros(1000)
    r = make_session(checkpoint_dir=url, every_steps=None)
    r.register({"a": b})
    assert r.step == 1 and np.array_equal(b, np.arange(1000.0))


def test_a_disabled_memory_tier_sends_checkpoints_to_storage_but_memory_is_still_read(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_session) -> None:  # noqa: ANN001
    monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage"))
    monkeypatch.setenv("LATTICE_MEMORY_DIR", str(tmp_path / "shm"))
    s = make_session(checkpoint_dir=url, every_steps=None)
    a = np.full(100, 3.0)
    s.register({"a": a})
    for _ in range(3):
        s.step_done()
    s.checkpoint()
    s.wait()
    assert open_store(url).list_committed() == []  # in memory only
    (tmp_path / "shm" / "DISABLED").write_text('{"by": "agent", "message": "too small"}')
    s.step_done()
    s.checkpoint()  # the switch is checked before each checkpoint
    s.wait()
    assert open_store(url).list_committed() == [4]
    assert not (tmp_path / "shm" / fmt.step_dirname(4)).exists()
    s.close()
    shutil.rmtree(tmp_path / "stage")
    open_store(url).delete(4)  # only memory has a checkpoint now: it must still be restorable
    s2 = make_session(checkpoint_dir=url, every_steps=None)
    b = np.zeros(100)
    s2.register({"a": b})
    assert (s2.step, b[0]) == (3, 3.0)
