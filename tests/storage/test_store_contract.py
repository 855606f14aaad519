"""One contract suite for every storage backend (file, memory://, s3:// on moto, lattice://):
manifest-last commit, listing, missing files, delete, retention, checksums, cleanup."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import crc32c
import pytest
from storage_support import Backend, make_checkpoint

from lattice.core import fmt
from lattice.core.errors import AlreadyCommittedError, CheckpointError, CorruptCheckpointError
from lattice.core.restore import check_sizes, read_manifest, verify_file
from lattice.core.stores import open_store, transfer
from lattice.core.stores.base import Store

pytestmark = pytest.mark.timeout(60)


def put_all(store: Store, local: Path, step: int, skip: tuple[str, ...] = ()) -> bytes:
    """Put every file of local checkpoint ``local`` (but ``skip``) without committing; returns the manifest."""
    raw = (local / fmt.MANIFEST).read_bytes()
    for name, info in fmt.parse_manifest(raw)["files"].items():
        if name not in skip:
            store.put_file(step, name, local / name, info["size"], info["crc32c"])
    return raw


def test_upload_lists_and_downloads_an_identical_checkpoint(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "src", 7)
    transfer.upload(local, backend.store, 7)
    assert backend.store.list_committed() == [7]
    assert backend.store.read_manifest(7) == (local / fmt.MANIFEST).read_bytes()
    got = transfer.download(backend.store, 7, tmp_path / "dst")
    assert got == tmp_path / "dst" / fmt.step_dirname(7)
    for name in (fmt.DATA, fmt.TREE, fmt.MANIFEST):
        assert (got / name).read_bytes() == (local / name).read_bytes()
    manifest = read_manifest(got)
    check_sizes(got, manifest)
    verify_file(got, manifest, fmt.DATA)
    with backend.store.open_file(7, fmt.DATA) as f:
        assert f.read() == (local / fmt.DATA).read_bytes()


def test_a_step_without_its_manifest_is_not_committed(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 3)
    put_all(backend.store, local, 3)
    assert backend.store.list_committed() == []
    with pytest.raises(FileNotFoundError):
        backend.store.read_manifest(3)
    with pytest.raises(FileNotFoundError):
        backend.store.open_file(3, fmt.DATA)
    with pytest.raises(FileNotFoundError):
        transfer.download(backend.store, 3, tmp_path / "dst")
    assert not (tmp_path / "dst" / fmt.step_dirname(3)).exists()


class _Watching:
    """Delegates to a store and records what listing shows before and after every file put."""

    def __init__(self, store: Store, step: int):
        self._store, self._step, self.seen = store, step, []

    def put_file(self, *args: Any) -> None:
        self.seen.append(self._step in self._store.list_committed())
        self._store.put_file(*args)
        self.seen.append(self._step in self._store.list_committed())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_listing_during_an_upload_never_shows_the_step(backend: Backend, tmp_path: Path) -> None:
    watching = _Watching(backend.store, 4)
    transfer.upload(make_checkpoint(tmp_path, 4), watching, 4)  # type: ignore[arg-type]
    assert watching.seen and not any(watching.seen)
    assert backend.store.list_committed() == [4]


def test_listing_from_another_thread_while_uploading_sees_only_committed_steps(backend: Backend, tmp_path: Path) -> None:
    transfer.upload(make_checkpoint(tmp_path / "a", 1), backend.store, 1)
    big = make_checkpoint(tmp_path / "b", 2, payload=bytes(4 << 20))
    seen: list[list[int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(backend.store.list_committed())

    t = threading.Thread(target=watch)
    t.start()
    try:
        transfer.upload(big, backend.store, 2)
    finally:
        stop.set()
        t.join(10)
    assert seen and all(s in ([1], [2, 1]) for s in seen), seen
    assert backend.store.list_committed() == [2, 1]


def test_commit_refuses_a_manifest_whose_files_were_not_all_put(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 5)
    raw = put_all(backend.store, local, 5, skip=(fmt.TREE,))
    with pytest.raises(CheckpointError, match=fmt.TREE):
        backend.store.commit(5, raw)
    assert backend.store.list_committed() == []


def test_missing_steps_and_files_raise_file_not_found(backend: Backend, tmp_path: Path) -> None:
    transfer.upload(make_checkpoint(tmp_path, 1), backend.store, 1)
    with pytest.raises(FileNotFoundError):
        backend.store.read_manifest(99)
    with pytest.raises(FileNotFoundError):
        backend.store.open_file(1, "no-such-file.bin")
    with pytest.raises(FileNotFoundError):
        backend.store.open_file(99, fmt.DATA)
    with pytest.raises(FileNotFoundError):
        backend.store.delete(99)
    with pytest.raises(FileNotFoundError):
        backend.store.put_file(2, fmt.DATA, tmp_path / "absent", 1, 0)


def test_delete_uncommits_and_removes_a_step(backend: Backend, tmp_path: Path) -> None:
    for step in (1, 2):
        transfer.upload(make_checkpoint(tmp_path, step), backend.store, step)
    backend.store.delete(1)
    assert backend.store.list_committed() == [2]
    with pytest.raises(FileNotFoundError):
        backend.store.open_file(1, fmt.DATA)
    with pytest.raises(FileNotFoundError):
        backend.store.delete(1)


def test_another_writer_reads_a_pending_file_before_the_commit(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 8)
    raw = put_all(backend.store, local, 8)
    name = sorted(fmt.parse_manifest(raw)["files"])[0]
    other = open_store(backend.url)  # another rank's client (ranks on several hosts, stores/assemble.py)
    if backend.name == "file":  # a directory store's uploads are private to the writing process
        with pytest.raises(NotImplementedError):
            other.read_pending(8, name)
        return
    assert other.read_pending(8, name) == (local / name).read_bytes()
    with pytest.raises(FileNotFoundError):
        other.read_pending(8, "rank-00009.part.json")
    with pytest.raises(FileNotFoundError):
        other.read_pending(9, name)


def test_delete_removes_a_pending_upload(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 6)
    put_all(backend.store, local, 6)
    backend.store.delete(6)
    transfer.upload(local, backend.store, 6)  # a fresh upload of the same step still works
    assert backend.store.list_committed() == [6]


def test_retention_keeps_the_newest_and_never_newer_timelines(backend: Backend, tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        transfer.upload(make_checkpoint(tmp_path, step), backend.store, step, keep=2)
    assert backend.store.list_committed() == [4, 3]
    transfer.upload(make_checkpoint(tmp_path / "rewound", 2), backend.store, 2, keep=1)
    assert backend.store.list_committed() == [4, 3, 2]  # steps newer than the new commit stay


def test_reupload_of_a_committed_step_replaces_it(backend: Backend, tmp_path: Path) -> None:
    transfer.upload(make_checkpoint(tmp_path / "a", 3, payload=b"old" * 100), backend.store, 3)
    with pytest.raises(AlreadyCommittedError):  # a CheckpointError that says why, on every backend
        backend.store.put_file(3, fmt.DATA, tmp_path / "a" / fmt.step_dirname(3) / fmt.DATA, 300, 0)
    new = make_checkpoint(tmp_path / "b", 3, payload=b"new" * 100)
    transfer.upload(new, backend.store, 3)
    with backend.store.open_file(3, fmt.DATA) as f:
        assert f.read() == b"new" * 100


def test_download_detects_a_file_damaged_in_the_store(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "src", 8, payload=bytes(range(256)) * 64)
    transfer.upload(local, backend.store, 8)
    damaged = bytearray((local / fmt.DATA).read_bytes())
    damaged[100] ^= 0xFF
    backend.overwrite(8, fmt.DATA, bytes(damaged))
    with pytest.raises(CorruptCheckpointError, match="crc32c mismatch") as info:
        transfer.download(backend.store, 8, tmp_path / "dst")
    assert info.value.file == fmt.DATA
    assert not (tmp_path / "dst" / fmt.step_dirname(8)).exists()


def test_download_detects_a_truncated_file(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "src", 9)
    transfer.upload(local, backend.store, 9)
    backend.overwrite(9, fmt.TREE, b"{")
    with pytest.raises(CorruptCheckpointError, match="bytes, manifest says"):
        transfer.download(backend.store, 9, tmp_path / "dst")


def test_put_file_with_the_wrong_checksum_is_refused_and_not_committable(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 2)
    raw = (local / fmt.MANIFEST).read_bytes()
    info = fmt.parse_manifest(raw)["files"]
    with pytest.raises(CorruptCheckpointError):
        backend.store.put_file(2, fmt.DATA, local / fmt.DATA, info[fmt.DATA]["size"], info[fmt.DATA]["crc32c"] ^ 1)
    backend.store.put_file(2, fmt.TREE, local / fmt.TREE, info[fmt.TREE]["size"], info[fmt.TREE]["crc32c"])
    with pytest.raises(CheckpointError):
        backend.store.commit(2, raw)
    assert backend.store.list_committed() == []


def test_files_put_from_memory_commit_and_read_back_like_files_put_from_disk(backend: Backend, tmp_path: Path) -> None:
    """``put_file`` of a memoryview (an upload straight from a snapshot buffer), including one
    whose format is not bytes, and the same checks: a wrong crc32c is refused."""
    import numpy as np

    local = make_checkpoint(tmp_path, 4)
    raw = (local / fmt.MANIFEST).read_bytes()
    info = fmt.parse_manifest(raw)["files"]
    data = bytearray((local / fmt.DATA).read_bytes())
    with pytest.raises(CorruptCheckpointError):
        backend.store.put_file(4, fmt.DATA, memoryview(data), info[fmt.DATA]["size"], info[fmt.DATA]["crc32c"] ^ 1)
    assert len(data) % 4 == 0  # safetensors pads its header; the helper's arrays are float64
    as_words = memoryview(np.frombuffer(data, dtype=np.uint32))  # a view whose format is not "B"
    backend.store.put_file(4, fmt.DATA, as_words, info[fmt.DATA]["size"], info[fmt.DATA]["crc32c"])
    tree = (local / fmt.TREE).read_bytes()
    backend.store.put_file(4, fmt.TREE, memoryview(tree), info[fmt.TREE]["size"], info[fmt.TREE]["crc32c"])
    backend.store.commit(4, raw)
    assert backend.store.list_committed() == [4]
    got = transfer.download(backend.store, 4, tmp_path / "dst")
    assert (got / fmt.DATA).read_bytes() == bytes(data) and (got / fmt.TREE).read_bytes() == tree


def test_cleanup_never_touches_committed_steps_or_fresh_uploads(backend: Backend, tmp_path: Path) -> None:
    transfer.upload(make_checkpoint(tmp_path / "a", 1), backend.store, 1)
    local = make_checkpoint(tmp_path / "b", 2)
    raw = put_all(backend.store, local, 2)
    backend.store.cleanup()
    assert backend.store.list_committed() == [1]
    backend.store.commit(2, raw)  # the upload in progress can still finish
    assert backend.store.list_committed() == [2, 1]


def test_checksums_of_the_helper_checkpoint_are_real(tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 1, payload=b"abc")
    info = fmt.parse_manifest((local / fmt.MANIFEST).read_bytes())["files"][fmt.DATA]
    assert info == {"size": 3, "crc32c": crc32c.crc32c(b"abc")}
