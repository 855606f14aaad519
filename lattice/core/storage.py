"""Checkpoints in a local directory: durable writes, atomic commit, listing, retention, cleanup.

Atomicity, per method: ``write_durable`` and ``set_latest`` replace their file atomically
(temp file, fsync, rename, fsync of the directory); ``commit`` is one ``rename`` of a fully
written, fsynced temporary directory, so a reader sees either no checkpoint or a complete
one; ``delete`` first renames a checkpoint out of the committed namespace, so a half-deleted
checkpoint never looks committed. A missing directory or file raises ``FileNotFoundError``
from readers; listing a missing root yields nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from . import fmt
from .errors import ConfigError

log = logging.getLogger("lattice")
TMP_TAG = ".tmp-"
TRASH_TAG = ".trash-"
CORRUPT_TAG = ".corrupt-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory."""
    host = socket.gethostname().replace("-", "_")
    tmp = path.with_name(f".{path.name}{TMP_TAG}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class LocalDirectory:
    """A checkpoint root directory on a local (or mounted) filesystem."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._host = socket.gethostname().replace("-", "_")

    def prepare(self) -> None:
        """Create the root if needed and check that it is a writable directory."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"checkpoint_dir {str(self.root)!r} cannot be created: {exc.strerror}") from None
        if not self.root.is_dir():
            raise ConfigError(f"checkpoint_dir {str(self.root)!r} exists and is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"checkpoint_dir {str(self.root)!r} is not writable by this user")

    def new_tmp(self, step: int) -> Path:
        """A fresh private directory for writing checkpoint ``step`` (not visible as committed)."""
        path = self.root / f"{fmt.step_dirname(step)}{TMP_TAG}{self._host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def commit(self, tmp: Path, step: int) -> Path:
        """Atomically publish a fully written ``tmp`` as checkpoint ``step``.

        An existing checkpoint of the same step (from an abandoned, newer timeline) is moved
        away first and deleted after the new one is in place.
        """
        fsync_dir(tmp)
        final = self.root / fmt.step_dirname(step)
        old = None
        if final.exists():
            old = self.root / f"{final.name}{TRASH_TAG}{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def set_latest(self, step: int) -> None:
        """Atomically point ``latest`` at checkpoint ``step`` (a hint for people and tools)."""
        write_durable(self.root / fmt.LATEST, (fmt.step_dirname(step) + "\n").encode())

    def committed(self) -> list[tuple[int, Path]]:
        """Committed checkpoints (final name and a manifest), newest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            step = fmt.parse_step_dirname(name)
            if step is None:
                continue
            if (self.root / name / fmt.MANIFEST).is_file():
                out.append((step, self.root / name))
            else:
                log.warning("ignoring %s: it has no %s, so it was never committed", self.root / name, fmt.MANIFEST)
        return sorted(out, reverse=True)

    def delete(self, path: Path) -> None:
        """Remove a checkpoint; it leaves the committed namespace atomically before its files go."""
        shutil.rmtree(self.retire(path), ignore_errors=True)

    def retire(self, path: Path) -> Path:
        """Take a checkpoint out of the committed namespace (one rename); returns where it went."""
        trash = path.with_name(f"{path.name}{TRASH_TAG}{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        return trash

    def retain(self, keep: int, newest: int) -> list[int]:
        """Keep the ``keep`` newest committed checkpoints up to step ``newest``; delete older ones.

        Checkpoints newer than ``newest`` (another timeline) are never deleted here.
        """
        retired = self.retire_old(keep, newest)
        for _, trash in retired:
            shutil.rmtree(trash, ignore_errors=True)
        return [step for step, _ in retired]

    def retire_old(self, keep: int, newest: int) -> list[tuple[int, Path]]:
        """``retain``'s first half: rename the checkpoints to drop out of the namespace, delete nothing.

        Returns (step, trash directory) for each; the caller removes the trash directories
        (a leftover one is removed by ``cleanup_leftovers``).
        """
        retired = []
        mine = [(s, p) for s, p in self.committed() if s <= newest]
        for step, path in mine[keep:]:
            try:
                retired.append((step, self.retire(path)))
            except OSError as exc:
                log.warning("could not delete old checkpoint %s: %s", path, exc)
        return retired

    def quarantine(self, path: Path) -> Path:
        """Move a damaged checkpoint aside (kept for inspection, never restored or counted again)."""
        dest = path.with_name(f"{path.name}{CORRUPT_TAG}{time.strftime('%Y%m%dT%H%M%S')}")
        os.rename(path, dest)
        return dest

    def cleanup_leftovers(self) -> list[Path]:
        """Delete temporary and trash directories that provably belong to no live writer.

        A temporary directory is ours to delete only if it was made on this host by a
        process that no longer exists; others are left alone.
        """
        removed = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return removed
        for name in names:
            path = self.root / name
            if TRASH_TAG in name or (TMP_TAG in name and self._writer_is_dead(name)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def _writer_is_dead(self, name: str) -> bool:
        try:
            host, pid, _ = name.split(TMP_TAG, 1)[1].rsplit("-", 2)
            pid_n = int(pid)
        except ValueError:
            return False
        if host != self._host:
            return False
        if pid_n == os.getpid():
            return False
        try:
            os.kill(pid_n, 0)
        except OSError as exc:
            return exc.errno == errno.ESRCH
        return False
