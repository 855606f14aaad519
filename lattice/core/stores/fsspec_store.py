"""A store on any fsspec filesystem (``s3://``, ``gs://``, ``memory://``, ...).

Object stores have no atomic rename, so the commit marker is the manifest object itself,
written last in one PUT: ``<root>/step-XXXXXXXXXX/<file>`` for every file first, then
``<root>/step-XXXXXXXXXX/manifest.json``. A step is committed only if its manifest exists and
parses (a torn or foreign manifest does not count). Deletion removes the manifest first.
Files of a step that never got a manifest are removed by ``cleanup`` once older than
``stale_after`` seconds (default one day), so an upload still running is never touched.

Options for the filesystem (credentials, ``endpoint_url``...) come from the ``options``
argument or the ``LATTICE_STORAGE_OPTIONS`` environment variable (a JSON object), passed to
``fsspec.core.url_to_fs``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from typing import Any, BinaryIO

import crc32c as _crc

from .. import fmt
from ..errors import AlreadyCommittedError, CheckpointError, ConfigError, CorruptCheckpointError
from .base import Source, Store, check_name, manifest_for_commit, named, parses, reading

log = logging.getLogger("lattice")
CHUNK = 8 << 20
STALE_AFTER = 24 * 3600.0


def storage_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``options`` over the JSON object in ``LATTICE_STORAGE_OPTIONS`` (for fsspec)."""
    raw = os.environ.get("LATTICE_STORAGE_OPTIONS", "").strip()
    env: dict[str, Any] = {}
    if raw:
        try:
            env = json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"LATTICE_STORAGE_OPTIONS is not valid JSON ({exc}); give a JSON object such as "
                              '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}') from None
        if not isinstance(env, dict):
            raise ConfigError("LATTICE_STORAGE_OPTIONS must be a JSON object of fsspec storage options")
    return {**env, **(options or {})}


class FsspecStore(Store):
    """Checkpoints under an fsspec URL; the manifest object written last is the commit marker."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, stale_after: float = STALE_AFTER):
        try:
            import fsspec.core
        except ImportError:
            raise ConfigError(f"checkpoint_dir {url!r} needs fsspec: pip install 'lattice[s3]'") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options(options))
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"checkpoint_dir {url!r}: cannot open this URL with fsspec: {exc}") from None
        self.url, self.root, self.stale_after = url, root.rstrip("/"), stale_after

    def _p(self, step: int, name: str | None = None) -> str:
        base = f"{self.root}/{fmt.step_dirname(step)}"
        return base if name is None else f"{base}/{name}"

    def _refresh(self) -> None:
        self.fs.invalidate_cache()  # listings must see other writers' objects

    def _objects(self) -> dict[str, dict[str, Any]]:
        """Every object under the root, by path relative to it (one recursive listing)."""
        self._refresh()
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        return {p[len(prefix):]: info for p, info in found.items() if p.startswith(prefix)}

    def list_committed(self) -> list[int]:
        """Steps whose manifest object exists and parses, newest first (one listing plus one GET each)."""
        steps = []
        for rel in self._objects():
            d, _, name = rel.partition("/")
            step = fmt.parse_step_dirname(d)
            if step is None or name != fmt.MANIFEST:
                continue
            try:
                raw = self.fs.cat_file(self._p(step, fmt.MANIFEST))
            except FileNotFoundError:
                continue  # deleted meanwhile
            if parses(raw, step):
                steps.append(step)
            else:
                log.warning("ignoring %s: its manifest does not parse, so it is not committed", self.describe(step))
        return sorted(steps, reverse=True)

    def read_manifest(self, step: int) -> bytes:
        """The manifest object of ``step``; ``FileNotFoundError`` if it does not exist."""
        self._refresh()
        return self.fs.cat_file(self._p(step, fmt.MANIFEST))

    def _has_manifest(self, step: int) -> bool:
        self._refresh()
        return self.fs.exists(self._p(step, fmt.MANIFEST))

    def put_file(self, step: int, name: str, source: Source, size: int, crc32c: int) -> None:
        """Stream ``source`` into object ``step-N/name``, checking size and crc32c (the object is removed on a mismatch)."""
        check_name(name)
        if self._has_manifest(step):
            raise AlreadyCommittedError(f"{self.describe(step)} is already committed; delete it before uploading it again")
        target = self._p(step, name)
        crc, n = 0, 0
        with reading(source) as src, self.fs.open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                crc = _crc.crc32c(chunk, crc)
                n += len(chunk)
                out.write(chunk)
        if (n, crc) != (size, crc32c):
            self.fs.rm_file(target)
            raise CorruptCheckpointError(named(source), None, f"changed while uploading: {n} bytes crc32c {crc:08x}, "
                                         f"expected {size} bytes crc32c {crc32c:08x}")

    def read_pending(self, step: int, name: str) -> bytes:
        """Object ``step-N/name`` as it is now (objects are whole once written); ``FileNotFoundError`` if absent."""
        check_name(name)
        self._refresh()
        return self.fs.cat_file(self._p(step, name))

    def commit(self, step: int, manifest: bytes, keep: int | None = None) -> None:
        """Check every listed file is there with its size, then PUT the manifest (the commit marker)."""
        doc = manifest_for_commit(manifest, step, self.describe(step))
        sizes = {rel.partition("/")[2]: info.get("size") for rel, info in self._objects().items()
                 if rel.startswith(fmt.step_dirname(step) + "/")}
        missing = [n for n, i in doc["files"].items() if sizes.get(n) != i["size"]]
        if missing:
            raise CheckpointError(f"cannot commit {self.describe(step)}: file(s) {missing} were not uploaded "
                                  "(or have another size); put every file before the manifest")
        self.fs.pipe_file(self._p(step, fmt.MANIFEST), manifest)
        if keep is not None:
            self.retain(keep, newest=step)

    def open_file(self, step: int, name: str) -> BinaryIO:
        """Open object ``step-N/name`` of a committed step; ``FileNotFoundError`` if not committed or missing."""
        check_name(name)
        if not self._has_manifest(step):
            raise FileNotFoundError(f"{self.describe(step)} is not committed")
        if not self.fs.exists(self._p(step, name)):
            raise FileNotFoundError(f"{self.describe(step)}/{name} does not exist")
        return self.fs.open(self._p(step, name), "rb", block_size=CHUNK)

    def delete(self, step: int) -> None:
        """Delete the manifest first (the step stops being committed at once), then its other objects."""
        names = [rel for rel in self._objects() if rel.startswith(fmt.step_dirname(step) + "/")]
        if not names:
            raise FileNotFoundError(f"{self.describe(step)} does not exist")
        manifest = f"{fmt.step_dirname(step)}/{fmt.MANIFEST}"
        if manifest in names:
            self.fs.rm_file(f"{self.root}/{manifest}")
        for rel in names:
            if rel != manifest:
                try:
                    self.fs.rm_file(f"{self.root}/{rel}")
                except FileNotFoundError:
                    pass
        self._refresh()

    def cleanup(self) -> list[str]:
        """Delete steps without a manifest whose newest object is older than ``stale_after`` seconds."""
        by_step: dict[int, list[tuple[str, float | None]]] = {}
        for rel, info in self._objects().items():
            step = fmt.parse_step_dirname(rel.partition("/")[0])
            if step is not None:
                by_step.setdefault(step, []).append((rel, _mtime(info)))
        removed, now = [], time.time()
        for objs in by_step.values():
            if any(rel.endswith("/" + fmt.MANIFEST) for rel, _ in objs):
                continue
            times = [t for _, t in objs]
            if any(t is None for t in times) or now - max(times) < self.stale_after:  # type: ignore[type-var]
                continue  # unknown age or possibly still uploading: leave it
            for rel, _ in objs:
                self.fs.rm_file(f"{self.root}/{rel}")
                removed.append(f"{self.root}/{rel}")
        if removed:
            log.info("removed %d object(s) of abandoned uploads from %s", len(removed), self.url)
        return removed


def _mtime(info: dict[str, Any]) -> float | None:
    """An object's modification time (seconds since the epoch) from fsspec info, if the backend gives one."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "timeCreated"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
