"""Persist and commit a snapshot in the background: data, tree, manifest, rename, retention.

Files are fsynced before the manifest; the manifest is written inside the private
temporary directory, which is then renamed to its final name (the commit) and the
``latest`` pointer replaced atomically. Old checkpoints are deleted only after that.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from pathlib import Path

import crc32c

from . import fmt
from .snapshot import Snapshot
from .storage import LocalDirectory, write_durable

log = logging.getLogger("lattice")
CHUNK = 64 << 20


def _crc_all(parts: list[memoryview]) -> int:
    crc = 0
    for part in parts:
        for i in range(0, len(part), CHUNK):
            crc = crc32c.crc32c(part[i:i + CHUNK], crc)
    return crc


def write_file(path: Path, parts: list[memoryview]) -> dict[str, int]:
    """Write ``parts`` to ``path`` and fsync it; the crc32c runs in a second thread meanwhile."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lattice-crc") as pool:
        crc = pool.submit(_crc_all, parts)
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for part in parts:
                for i in range(0, len(part), CHUNK):
                    chunk = part[i:i + CHUNK]
                    while chunk:
                        n = os.write(fd, chunk)
                        chunk = chunk[n:]
                        size += n
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"size": size, "crc32c": crc.result()}


class Persister:
    """Runs at most one persist at a time on a background thread."""

    def __init__(self, storage: LocalDirectory, keep: int):
        self.storage, self.keep = storage, keep
        self.last_committed: int | None = None
        self.last_persist_s: float | None = None

    def submit(self, snap: Snapshot) -> concurrent.futures.Future[Path]:
        future: concurrent.futures.Future[Path] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()

        def run() -> None:
            try:
                future.set_result(self.persist(snap))
            except BaseException as exc:  # reported through the future and the log
                log.error("checkpoint of step %d failed: %s: %s", snap.step, type(exc).__name__, exc)
                future.set_exception(exc)

        threading.Thread(target=run, name=f"lattice-persist-{snap.step}", daemon=True).start()
        return future

    def persist(self, snap: Snapshot) -> Path:
        t0 = time.perf_counter()
        tmp = self.storage.new_tmp(snap.step)
        files = {
            fmt.DATA: write_file(tmp / fmt.DATA, [memoryview(snap.layout.header), memoryview(snap.data)]),
            fmt.TREE: write_file(tmp / fmt.TREE, [memoryview(snap.tree)]),
        }
        manifest = fmt.manifest(snap.step, snap.wall_time, files, snap.adapters,
                                {"blocking_seconds": round(snap.blocking_s, 6)})
        write_durable(tmp / fmt.MANIFEST, manifest)
        final = self.storage.commit(tmp, snap.step)
        self.storage.set_latest(snap.step)
        self.last_committed = snap.step
        self.last_persist_s = time.perf_counter() - t0
        deleted = self.storage.retain(self.keep, newest=snap.step)
        log.info("checkpoint step %d committed to %s (%.1f MB, blocked %.3fs, persisted in %.3fs)%s",
                 snap.step, final, snap.layout.file_size / 1e6, snap.blocking_s, self.last_persist_s,
                 f"; deleted old step(s) {deleted}" if deleted else "")
        return final
