"""Worker side of the memory tier (contract B) and staging behaviour of a URL checkpoint_dir."""

from __future__ import annotations

import shutil
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
