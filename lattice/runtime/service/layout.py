"""The checkpoint service's files under ``--root``: committed checkpoints, uploads, cleanup.

``<root>/<job>/`` is an ordinary Lattice checkpoint root (``step-XXXXXXXXXX/`` directories
with a manifest, a ``latest`` pointer), built with :class:`lattice.core.storage.LocalDirectory`,
so ``lattice ckpt verify <root>/<job>`` and a local restore work on it directly. Work in
progress is hidden: ``.part-<step>-<random>`` files being received and
``.upload-<step>-<random>/`` directories of verified files waiting for their manifest. The
service owns the root alone (a lock file enforces it), so every hidden entry found at start
is a leftover of a crash and is deleted. All methods here block (disk I/O); the server calls
them from worker threads.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from lattice.core import fmt
from lattice.core.errors import ConfigError
from lattice.core.storage import TMP_TAG, TRASH_TAG, LocalDirectory, fsync_dir, write_durable

from .names import JOB_RE

log = logging.getLogger("lattice")
LOCK_FILE = ".lattice-service.lock"
UPLOAD_TAG = ".upload-"
PART_TAG = ".part-"


class JobDir:
    """One job's checkpoint root ``<root>/<job>``; the job name must already be validated."""

    def __init__(self, root: Path, job: str) -> None:
        self.path = root / job
        self.local = LocalDirectory(self.path)

    def committed(self) -> list[tuple[int, Path]]:
        """Committed checkpoints (step, directory), newest first; none if the job is unknown."""
        return self.local.committed()

    def committed_dir(self, step: int) -> Path | None:
        """The directory of committed checkpoint ``step``, or ``None``."""
        path = self.path / fmt.step_dirname(step)
        return path if (path / fmt.MANIFEST).is_file() else None

    def ensure(self) -> None:
        """Create the job directory if needed, durably (its entry in the root is fsynced)."""
        if not self.path.is_dir():
            self.path.mkdir(exist_ok=True)
            fsync_dir(self.path.parent)

    def new_part(self, step: int) -> Path:
        """A fresh hidden path to receive one file of ``step`` into (creates the job directory)."""
        self.ensure()
        return self.path / f"{PART_TAG}{step:010d}-{uuid.uuid4().hex}"

    def new_upload_dir(self, step: int) -> Path:
        """A fresh hidden directory collecting the verified files of ``step`` until its manifest."""
        self.ensure()
        path = self.path / f"{UPLOAD_TAG}{step:010d}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def commit(self, upload_dir: Path, step: int, manifest: bytes, listed: set[str]) -> Path:
        """Publish ``upload_dir`` as checkpoint ``step`` atomically (manifest written last).

        Files not listed in the manifest are dropped first; every listed file was fsynced on
        arrival. Then: manifest (temp, fsync, rename), directory fsync, one rename to
        ``step-N``, fsync of the job directory, ``latest`` updated.
        """
        for entry in os.listdir(upload_dir):
            if entry not in listed:
                log.warning("job %s step %d: dropping %s, which the manifest does not list",
                            self.path.name, step, entry)
                (upload_dir / entry).unlink(missing_ok=True)
        write_durable(upload_dir / fmt.MANIFEST, manifest)
        final = self.local.commit(upload_dir, step)
        self.update_latest()
        return final

    def update_latest(self) -> None:
        """Point ``latest`` at the newest committed checkpoint (remove it if there is none)."""
        committed = self.committed()
        if committed:
            self.local.set_latest(committed[0][0])
        else:
            (self.path / fmt.LATEST).unlink(missing_ok=True)

    def delete_committed(self, step: int) -> bool:
        """Delete committed checkpoint ``step`` (out of the namespace first); False if absent."""
        path = self.committed_dir(step)
        if path is None:
            return False
        self.local.delete(path)
        self.update_latest()
        return True

    def retain(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` committed checkpoints; return the deleted steps."""
        committed = self.committed()
        if len(committed) <= keep:
            return []
        deleted = self.local.retain(keep, committed[0][0])
        self.update_latest()
        return deleted

    def summary(self, step: int, path: Path) -> dict[str, Any] | None:
        """``{"step", "size", "files", "wall_time"}`` of a committed checkpoint (None if unreadable)."""
        try:
            doc = fmt.parse_manifest((path / fmt.MANIFEST).read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("job %s: cannot read the manifest of %s: %s", self.path.name, path.name, exc)
            return None
        return {"step": step, "size": sum(f["size"] for f in doc["files"].values()),
                "files": len(doc["files"]), "wall_time": doc.get("wall_time")}

    def file_crc(self, step: int, name: str) -> int | None:
        """The crc32c the manifest of committed ``step`` records for ``name`` (None if unknown)."""
        path = self.committed_dir(step)
        try:
            doc = fmt.parse_manifest((path / fmt.MANIFEST).read_bytes()) if path else None
        except (OSError, ValueError, RecursionError):
            return None
        info = doc["files"].get(name) if doc else None
        return info["crc32c"] if info else None

    def cleanup(self) -> list[Path]:
        """Delete every hidden entry (parts, uploads, temp and trash directories): crash leftovers."""
        removed = []
        for name in os.listdir(self.path):
            if not (name.startswith(".") or TMP_TAG in name or TRASH_TAG in name):
                continue
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        if removed:
            fsync_dir(self.path)
        return removed


class ServiceRoot:
    """The ``--root`` directory: job directories, the single-owner lock, startup cleanup."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root).absolute()
        self._lock_fd: int | None = None

    def open(self) -> list[Path]:
        """Create the root if needed, take its lock, delete crash leftovers; return what was removed.

        Raises:
            ConfigError: the root cannot be created or written, or another service holds it.
        """
        LocalDirectory(self.path).prepare()
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"--root {str(self.path)!r} is in use by another checkpoint service "
                              f"(it holds {LOCK_FILE}); give each service its own root") from None
        self._lock_fd = fd
        removed = []
        for job in self.jobs():
            removed += self.job(job).cleanup()
        return removed

    def close(self) -> None:
        """Release the root's lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def jobs(self) -> list[str]:
        """Names of the job directories under the root, sorted."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if JOB_RE.fullmatch(n) and ".." not in n
                      and (self.path / n).is_dir() and not (self.path / n).is_symlink())

    def job(self, job: str) -> JobDir:
        """The directory of a (validated) job name."""
        return JobDir(self.path, job)

    def inside(self, path: Path, base: Path | None = None) -> bool:
        """Whether ``path``, with symlinks resolved, lies inside ``base`` (default: the root)."""
        real = os.path.realpath(path)
        return real.startswith(os.path.realpath(base or self.path) + os.sep)
