"""Moving whole checkpoints between a local directory and a store: files first, manifest last.

``upload`` puts every file a local checkpoint's manifest lists (each checked against the
manifest's size and crc32c) and then commits with the manifest; ``download`` streams every
file of a committed step into a private local directory, checks each against the manifest
and renames the directory into place. Both retry transient errors (connection resets,
timeouts, 5xx) with exponential backoff and show a progress line for 1 GiB or more.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .. import fmt
from ..errors import CheckpointError, CorruptCheckpointError
from ..progress import Progress
from ..storage import LocalDirectory, write_durable
from . import ranged
from .base import Store, copy_with_crc, stored_manifest

log = logging.getLogger("lattice")
CHUNK = 8 << 20
RETRIES = 5
BACKOFF = 0.2  # seconds, doubled per attempt, at most MAX_BACKOFF
MAX_BACKOFF = 5.0
T = TypeVar("T")
Sent = dict[str, tuple[int, int]]  # file name -> (size, crc32c) already put for a step


class TransientStoreError(OSError):
    """A failure worth retrying (connection lost, timeout, a 5xx or 429 answer)."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may go away on retry: network and server-side errors, not missing files or bad input."""
    if isinstance(exc, TransientStoreError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    return type(exc) is OSError  # fsspec backends report network trouble as a plain OSError


def retry(what: str, fn: Callable[[], T], retries: int = RETRIES) -> T:
    """Call ``fn``; on a transient error wait (exponential backoff) and try again, ``retries`` times."""
    delay = BACKOFF
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == retries or not is_transient(exc):
                raise
            log.warning("%s failed (%s: %s); retrying in %.1fs (%d/%d)", what, type(exc).__name__, exc,
                        delay, attempt + 1, retries)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
    raise AssertionError("unreachable")


def upload(local_dir: Path, store: Store, step: int, keep: int | None = None,
           sent: Sent | None = None) -> None:
    """Upload committed local checkpoint ``local_dir`` as ``step``: every file, then the manifest.

    A step already committed in the store (from an abandoned timeline) is deleted first, as a
    local commit replaces it. With ``keep``, retention runs on the store after the commit.
    ``sent``: files already put for this step (name -> size, crc32c; the caller dropped the
    other timeline then); those the manifest lists with the same size and crc32c are not put
    again. Raises ``CorruptCheckpointError`` if a local file does not match its manifest, and
    the last error if a transient one outlasts the retries; the step then stays uncommitted.
    """
    local_dir = Path(local_dir)
    raw = (local_dir / fmt.MANIFEST).read_bytes()
    try:
        doc = fmt.parse_manifest(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(str(local_dir), fmt.MANIFEST, f"is not a valid manifest: {exc}") from None
    if doc["step"] != step:
        raise CheckpointError(f"{local_dir} holds step {doc['step']}, not {step}")
    if sent is None:
        drop_other_timeline(store, step)
    todo = {n: i for n, i in doc["files"].items() if (sent or {}).get(n) != (i["size"], i["crc32c"])}
    total = sum(i["size"] for i in doc["files"].values())
    t0 = time.perf_counter()
    with Progress(f"upload {fmt.step_dirname(step)}", sum(i["size"] for i in todo.values())) as bar:
        for name, info in todo.items():
            path = local_dir / name
            retry(f"uploading {path}", lambda n=name, p=path, i=info: store.put_file(step, n, p, i["size"], i["crc32c"]))
            bar.update(info["size"])
    commit_manifest(store, step, raw, keep)
    log.info("uploaded step %d to %s (%.1f MB in %.2fs%s)", step, store.url, total / 1e6, time.perf_counter() - t0,
             f", {len(doc['files']) - len(todo)} of {len(doc['files'])} files sent from memory before" if sent else "")


def drop_other_timeline(store: Store, step: int) -> None:
    """Delete ``step`` from the store if it is committed there already (an abandoned timeline's):
    the checkpoint about to be put replaces it."""
    if step in retry(f"listing {store.url}", store.list_committed):
        log.warning("%s is already committed (another timeline); replacing it", store.describe(step))
        retry(f"deleting {store.describe(step)}", lambda: store.delete(step))


def commit_manifest(store: Store, step: int, raw: bytes, keep: int | None) -> None:
    """Commit ``step`` with manifest ``raw`` (transient errors retried; a commit whose answer was lost counts)."""
    def attempt() -> None:
        try:
            store.commit(step, raw, keep)
        except CheckpointError:
            if _committed_as(store, step, raw):  # an earlier attempt landed but its answer was lost
                return
            raise
    retry(f"committing {store.describe(step)}", attempt)


def _committed_as(store: Store, step: int, raw: bytes) -> bool:
    try:
        return store.read_manifest(step) == raw
    except OSError:
        return False


def download(store: Store, step: int, local_root: Path) -> Path:
    """Download committed ``step`` into local checkpoint root ``local_root``; returns its directory.

    If ``local_root`` already holds that step with the same manifest, nothing is read but the
    manifest. Otherwise each file streams into a private temporary directory with its size and
    crc32c checked against the manifest (one more try on a mismatch, then
    ``CorruptCheckpointError``); the directory is renamed to ``step-N`` only when complete.
    Raises ``FileNotFoundError`` if ``step`` is not committed in the store.
    """
    raw = retry(f"reading {store.describe(step)}", lambda: store.read_manifest(step))
    doc = stored_manifest(raw, step, store.describe(step))
    local = LocalDirectory(local_root)
    local.prepare()
    final = Path(local_root) / fmt.step_dirname(step)
    if _same_manifest(final, raw):
        return final
    tmp = local.new_tmp(step)
    try:
        total = sum(i["size"] for i in doc["files"].values())
        with Progress(f"download {fmt.step_dirname(step)}", total) as bar:
            for name, info in doc["files"].items():
                _fetch_checked(store, step, name, info, tmp / name, bar)
        write_durable(tmp / fmt.MANIFEST, raw)
        return local.commit(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _same_manifest(path: Path, raw: bytes) -> bool:
    try:
        return (path / fmt.MANIFEST).read_bytes() == raw
    except OSError:
        return False


def _fetch_checked(store: Store, step: int, name: str, info: dict, dest: Path, bar: Progress) -> None:
    """Stream one file to ``dest`` and check it; a mismatch is tried once more (it may be in transit)."""
    for attempt in (1, 2):
        size, crc = retry(f"downloading {store.describe(step)}/{name}", lambda: _fetch(store, step, name, dest, info["size"]))
        if (size, crc) == (info["size"], info["crc32c"]):
            bar.update(size)
            return
        reason = (f"crc32c mismatch (the file is corrupt): got {crc:08x}, manifest says {info['crc32c']:08x}"
                  if size == info["size"] else f"has {size} bytes, manifest says {info['size']}")
        if attempt == 2:
            raise CorruptCheckpointError(store.describe(step), name, reason)
        log.warning("%s/%s %s; downloading it again", store.describe(step), name, reason)


def _fetch(store: Store, step: int, name: str, dest: Path, size: int) -> tuple[int, int]:
    """Stream file ``name`` into ``dest``; a big one as several ranges at once (``ranged``)."""
    parts = ranged.ranges(size)
    try:
        if len(parts) > 1:
            return ranged.fetch_ranges(store, step, name, dest, parts)
        src = store.open_file(step, name)
    except FileNotFoundError:
        if step not in store.list_committed():
            raise
        raise CorruptCheckpointError(store.describe(step), name, "is missing") from None
    with src:
        return copy_with_crc(src, dest, CHUNK)
