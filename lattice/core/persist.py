"""Persist and commit a snapshot in the background: data, tree, manifest, rename, retention.

Files are fsynced before the manifest; the manifest is written inside the private
temporary directory, which is then renamed to its final name (the commit) and the
``latest`` pointer replaced atomically. Old checkpoints are deleted only after that.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from . import fmt
from .ranks import shared_tmp, wait_parts, write_part
from .snapshot import Fill, Snapshot, SnapshotAborted
from .storage import LocalDirectory, write_durable

log = logging.getLogger("lattice")
CHUNK = 64 << 20
DIRECT_ALIGN = 4096


class Pending:
    """A buffer still being filled: its bytes ``[0, end)`` are ready once ``fill`` reached ``end - ready``."""

    def __init__(self, view: memoryview, fill: Fill, ready: int = 0):
        self.view, self.fill, self.ready = view, fill, ready  # ``ready``: bytes at the start already set

    def wait(self, end: int) -> None:
        if end > self.ready:
            self.fill.wait(end - self.ready)


def _chunks(parts: list[memoryview | Pending]) -> Iterator[memoryview]:
    """Every part in ``CHUNK`` pieces, each yielded only once its bytes are ready."""
    for part in parts:
        view = part.view if isinstance(part, Pending) else part
        for i in range(0, len(view), CHUNK):
            end = min(i + CHUNK, len(view))
            if isinstance(part, Pending):
                part.wait(end)
            yield view[i:end]


def _crc_all(parts: list[memoryview | Pending]) -> int:
    crc = 0
    for chunk in _chunks(parts):
        crc = crc32c.crc32c(chunk, crc)
    return crc


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class Writeback:
    """Send each written chunk to the disk at once, with at most two chunks in flight.

    Without this the whole file sits dirty in the page cache until ``fsync`` writes it in
    one go, which measured 2-4x slower (and far noisier) for 1 GiB on a virtual disk. This
    is a hint only: ``fsync`` alone still makes the file durable. A chunk already on disk is
    dropped from the page cache (the writer never reads a checkpoint back), which keeps a
    checkpoint from pushing the training job's own cached files out.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.prev: tuple[int, int] | None = None

    def wrote(self, begin: int, end: int) -> None:
        if _sync_file_range is None or end <= begin:
            return
        _sync_file_range(self.fd, begin, end - begin, _SFR_WRITE)  # errors ignored: a hint
        if self.prev is not None:
            b, e = self.prev
            _sync_file_range(self.fd, b, e - b, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
            try:
                os.posix_fadvise(self.fd, b, e - b, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        self.prev = (begin, end)


def write_file(path: Path, parts: list[memoryview | Pending]) -> dict[str, int]:
    """Write ``parts`` to ``path`` and fsync it; the crc32c runs in a second thread meanwhile.

    A ``Pending`` part is written (and checksummed) region by region as its copy completes.

    A plain thread, not a ``concurrent.futures`` pool: pools refuse new work once the
    interpreter starts shutting down, which would fail a checkpoint still persisting when
    the program ends (``lattice.close`` waits for it at exit).
    """
    crc: dict[str, Any] = {}

    def checksum() -> None:
        try:
            for part in parts:  # start once the snapshot copy is done: on a small host the
                if isinstance(part, Pending):  # checksum would otherwise slow the blocking copy
                    part.wait(len(part.view))
            crc["value"] = _crc_all(parts)
        except BaseException as exc:  # re-raised below, in the persist thread
            crc["error"] = exc

    worker = threading.Thread(target=checksum, name="lattice-crc", daemon=True)
    worker.start()
    try:
        size = _write_synced(path, parts)
    finally:
        worker.join()
    if "error" in crc:
        raise crc["error"]
    return {"size": size, "crc32c": crc["value"]}


def _write_synced(path: Path, parts: list[memoryview | Pending]) -> int:
    """Create ``path`` with the bytes of ``parts`` and fsync it; returns the size.

    Page-aligned stretches go through a second, ``O_DIRECT`` descriptor (straight from the
    buffer to the disk: no copy into the page cache, no dirty pages); the rest, or all of it
    where the filesystem refuses ``O_DIRECT``, is written normally with writeback hints.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    direct = _Direct(path)
    size = 0
    try:
        writeback = Writeback(fd)
        for chunk in _chunks(parts):
            done = direct.write(chunk, size)
            pwrite_all(fd, chunk[done:], size + done)
            writeback.wrote(size + done, size + len(chunk))
            size += len(chunk)
        os.fsync(fd)  # covers the O_DIRECT writes too: one inode
    finally:
        direct.close()
        os.close(fd)
    return size


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _Direct:
    """An ``O_DIRECT`` descriptor for a file, used while the filesystem accepts it."""

    def __init__(self, path: Path):
        self.fd: int | None = None
        flag = getattr(os, "O_DIRECT", 0)
        if flag and os.environ.get("LATTICE_NO_DIRECT_IO") != "1":
            try:
                self.fd = os.open(path, os.O_WRONLY | flag)
            except OSError:
                self.fd = None  # e.g. tmpfs: write normally

    def write(self, chunk: memoryview, offset: int) -> int:
        """Write the longest aligned prefix of ``chunk`` at ``offset``; returns how many bytes."""
        if self.fd is None or offset % DIRECT_ALIGN or _address(chunk) % DIRECT_ALIGN:
            return 0
        want, done = len(chunk) - len(chunk) % DIRECT_ALIGN, 0
        try:
            while done < want:
                n = os.pwrite(self.fd, chunk[done:want], offset + done)
                if n <= 0 or n % DIRECT_ALIGN:
                    return done + max(n, 0)  # a short write: the caller writes the rest normally
                done += n
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.close()  # this filesystem or device wants other alignment: write normally
        return done

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


class Persister:
    """Runs at most one persist at a time on a background thread.

    The future that ``submit`` returns resolves at the commit, once the checkpoints that
    retention drops are renamed out of the committed namespace; their files are unlinked
    after that on the same thread, off the critical path. ``join`` waits for that too.
    """

    def __init__(self, storage: LocalDirectory, keep: int):
        self.storage, self.keep = storage, keep
        self.last_committed: int | None = None
        self.last_persist_s: float | None = None
        self.on_commit: Callable[[int, float, float], None] | None = None  # (step, stall s, persist s)
        self.part_timeout = 600.0  # rank 0 waits this long for the other ranks' parts
        # ranks on several hosts with a URL: (tmp, snap, files, manifest_for) -> committed here?
        # (stores/assemble.py); None: the ranks share the storage directory
        self.assemble: Callable[..., bool] | None = None
        self._thread: threading.Thread | None = None

    def submit(self, snap: Snapshot) -> concurrent.futures.Future[Path]:
        """Persist ``snap`` in the background; its parts may still be filling (see ``Fill``)."""
        future: concurrent.futures.Future[Path] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()

        def run() -> None:
            try:
                final = self.persist(snap)
            except BaseException as exc:  # reported through the future and the log
                log.error("checkpoint of step %d failed: %s: %s", snap.step, type(exc).__name__, exc)
                future.set_exception(exc)
                return
            retired = self._retire(snap.step) if final.name == fmt.step_dirname(snap.step) else []
            future.set_result(final)
            for _, trash in retired:  # the slow part (unlinking the files) after the commit is reported
                shutil.rmtree(trash, ignore_errors=True)

        self._thread = threading.Thread(target=run, name=f"lattice-persist-{snap.step}", daemon=True)
        self._thread.start()
        return future

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the last persist, its retention included; False if ``timeout`` ran out."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def persist(self, snap: Snapshot) -> Path:
        t0 = time.perf_counter()
        multi = snap.ranks.world > 1
        if multi and self.assemble is not None:
            return self._persist_through_store(snap, t0)
        tmp = shared_tmp(self.storage.root, snap.step, snap.ranks, snap.seq) if multi else self.storage.new_tmp(snap.step)
        try:
            files = self._write_parts(tmp, snap)
            if multi:
                write_part(tmp, snap.ranks.rank, files)
                if snap.ranks.rank != 0:
                    self.last_persist_s = time.perf_counter() - t0
                    return tmp  # rank 0 commits once every rank's part is in
                files = wait_parts(tmp, snap.ranks.world, self.part_timeout)
            final = self._commit(tmp, snap, files)
        except BaseException:
            if not multi:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing of it was committed
            raise
        self._committed(snap, t0, final)
        return final

    def _committed(self, snap: Snapshot, t0: float, where: object) -> None:
        self.last_committed = snap.step
        self.last_persist_s = time.perf_counter() - t0
        if self.on_commit is not None:
            self.on_commit(snap.step, snap.blocking_s, self.last_persist_s)
        log.info("checkpoint step %d committed to %s (%.1f MB, blocked %.3fs, persisted in %.3fs)",
                 snap.step, where, snap.nbytes / 1e6, snap.blocking_s, self.last_persist_s)

    def _persist_through_store(self, snap: Snapshot, t0: float) -> Path:
        """Ranks on several hosts: write into a private staging directory, put the files into the
        store, rank 0 commits there (stores/assemble.py); the staging copy is removed after."""
        assert self.assemble is not None
        tmp = self.storage.new_tmp(snap.step)
        try:
            files = self._write_parts(tmp, snap)
            committed = self.assemble(tmp, snap, files, lambda everything: self._manifest(snap, everything))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if committed:
            self._committed(snap, t0, f"the store (step {snap.step})")
        else:
            self.last_persist_s = time.perf_counter() - t0
        return tmp

    def _retire(self, step: int) -> list[tuple[int, Path]]:
        """Rename the checkpoints that retention drops out of the committed namespace (fast)."""
        try:
            retired = self.storage.retire_old(self.keep, newest=step)
        except Exception as exc:  # the checkpoint is committed; a failed cleanup only wastes space
            log.warning("retention after step %d failed: %s: %s", step, type(exc).__name__, exc)
            return []
        if retired:
            log.info("deleted old checkpoint step(s) %s after committing step %d", [s for s, _ in retired], step)
        return retired

    def _write_parts(self, tmp: Path, snap: Snapshot) -> dict[str, dict[str, int]]:
        files = {}
        for part in snap.parts:
            files[part.tree_name] = write_file(tmp / part.tree_name, [memoryview(part.tree)])
            ready = len(part.layout.header)  # the header is in the buffer already; the arrays follow
            files[part.data_name] = write_file(tmp / part.data_name, [Pending(memoryview(part.file), part.fill, ready)])
        snap.copied.wait()  # set once the copy has finished (or failed); orders blocking_s
        if snap.copy_error is not None:
            raise SnapshotAborted(f"the snapshot copy failed: {snap.copy_error!r}")
        return files

    def _manifest(self, snap: Snapshot, files: dict[str, dict[str, int]]) -> bytes:
        items = {name: {"adapter": adapter, "scope": "rank" if name in snap.per_rank else "shared"}
                 for name, adapter in snap.adapters.items()}
        extra: dict[str, object] = {"blocking_seconds": round(snap.blocking_s, 6)}
        if snap.ranks.world > 1:
            extra.update(world_size=snap.ranks.world, ranks=list(range(snap.ranks.world)))
        return fmt.manifest(snap.step, snap.wall_time, files, items, extra)

    def _commit(self, tmp: Path, snap: Snapshot, files: dict[str, dict[str, int]]) -> Path:
        write_durable(tmp / fmt.MANIFEST, self._manifest(snap, files))
        final = self.storage.commit(tmp, snap.step)
        self.storage.set_latest(snap.step)
        return final
