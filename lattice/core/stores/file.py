"""A store on a local or mounted directory (plain path or ``file://``), in the local layout.

It reuses ``LocalDirectory``: files are put into a private ``step-N.tmp-<host>-<pid>-<rand>``
directory and the commit is one atomic rename of that directory (which already holds the
manifest), exactly as a local checkpoint commits; so the directory can be restored in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from .. import fmt
from ..errors import AlreadyCommittedError, CheckpointError, ConfigError, CorruptCheckpointError
from ..storage import LocalDirectory, write_durable
from .base import Source, Store, check_name, copy_with_crc, manifest_for_commit, named, reading

COPY_CHUNK = 8 << 20


def path_of(url: str) -> Path:
    """The local path of a plain path or a ``file://`` URL (``file:///abs/path`` or ``file://rel``)."""
    if url.startswith("file://"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"checkpoint_dir {url!r}: file:// URLs name a local path (file:///abs/path); "
                              f"host {parts.netloc!r} is not supported")
        return Path(unquote(parts.path))
    return Path(url)


class FileStore(Store):
    """Checkpoints in a directory; commit is an atomic directory rename (see the module docstring)."""

    def __init__(self, url: str):
        self.url = url
        self.local_root = path_of(url)
        self.dir = LocalDirectory(self.local_root)
        self._pending: dict[int, Path] = {}

    def _committed_path(self, step: int) -> Path:
        return self.local_root / fmt.step_dirname(step)

    def list_committed(self) -> list[int]:
        """Step directories under their final name with a manifest, newest first (a rename makes them appear)."""
        return [step for step, _ in self.dir.committed()]

    def read_manifest(self, step: int) -> bytes:
        """The manifest of committed ``step``; ``FileNotFoundError`` if not committed."""
        return (self._committed_path(step) / fmt.MANIFEST).read_bytes()

    def put_file(self, step: int, name: str, source: Source, size: int, crc32c: int) -> None:
        """Copy ``source`` into the step's private upload directory, fsynced, checking size and crc32c."""
        check_name(name)
        if (self._committed_path(step) / fmt.MANIFEST).is_file():
            raise AlreadyCommittedError(f"{self.describe(step)} is already committed; delete it before uploading it again")
        tmp = self._pending.get(step)
        if tmp is None or not tmp.is_dir():
            self.dir.prepare()
            tmp = self._pending[step] = self.dir.new_tmp(step)
        dest = tmp / name
        with reading(source) as src:
            n, crc = copy_with_crc(src, dest, COPY_CHUNK)
        if (n, crc) != (size, crc32c):
            dest.unlink(missing_ok=True)
            raise CorruptCheckpointError(named(source), None, f"changed while uploading: {n} bytes crc32c {crc:08x}, "
                                         f"expected {size} bytes crc32c {crc32c:08x}")

    def commit(self, step: int, manifest: bytes, keep: int | None = None) -> None:
        """Write the manifest into the upload directory and rename it to ``step-N`` (atomic)."""
        tmp = self._pending.get(step)
        doc = manifest_for_commit(manifest, step, self.describe(step))
        missing = [n for n, i in doc["files"].items()
                   if tmp is None or not (tmp / n).is_file() or (tmp / n).stat().st_size != i["size"]]
        if missing:
            raise CheckpointError(f"cannot commit {self.describe(step)}: file(s) {missing} were not uploaded "
                                  "(or have another size); put every file before the manifest")
        write_durable(tmp / fmt.MANIFEST, manifest)
        self.dir.commit(tmp, step)
        self._pending.pop(step, None)
        self.dir.set_latest(step)
        if keep is not None:
            self.retain(keep, newest=step)

    def open_file(self, step: int, name: str) -> BinaryIO:
        """Open a file of committed ``step``; ``FileNotFoundError`` if the step or the file is missing."""
        if name != fmt.MANIFEST:
            check_name(name)
        if not (self._committed_path(step) / fmt.MANIFEST).is_file():
            raise FileNotFoundError(f"{self.describe(step)} is not committed")
        return open(self._committed_path(step) / name, "rb")

    def delete(self, step: int) -> None:
        """Rename the step out of the committed namespace (atomic), then remove it; pending uploads too."""
        found = False
        tmp = self._pending.pop(step, None)
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            found = True
        path = self._committed_path(step)
        if path.is_dir():
            self.dir.delete(path)
            found = True
        if not found:
            raise FileNotFoundError(f"{self.describe(step)} does not exist")

    def cleanup(self) -> list[str]:
        """Remove upload directories of dead writers on this host and trash left by deletions."""
        return [str(p) for p in self.dir.cleanup_leftovers()]

