"""The storage interface every checkpoint backend implements, with its atomicity contract.

A store holds checkpoints of one job, each a set of files plus the Lattice ``manifest.json``
(docs/format.md). The commit protocol is the same on every backend: every file of a step is
put first, the manifest last; a step is *committed* (listed, readable, restorable) only once
its manifest is in place and parses. Each method says how it is atomic on its own and what it
does when something is missing; backends must keep to that (tests/storage runs one contract
suite against all of them).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import crc32c as _crc

from .. import fmt
from ..errors import CheckpointError, CorruptCheckpointError

log = logging.getLogger("lattice")
Source = Path | memoryview  # what put_file uploads: a local file, or bytes in memory


def byte_view(view: memoryview) -> memoryview:
    """``view`` as one flat run of bytes (a view of a float array counts elements, not bytes)."""
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _ViewReader:
    """``read(n)`` over a memoryview, handing out slices (no copy)."""

    def __init__(self, view: memoryview):
        self.view, self.at = byte_view(view), 0

    def read(self, n: int = -1) -> memoryview:
        end = len(self.view) if n < 0 else min(len(self.view), self.at + n)
        out, self.at = self.view[self.at:end], end
        return out


class Limited:
    """At most ``length`` bytes of ``f``, from where it stands; closing it closes ``f``."""

    def __init__(self, f: BinaryIO, length: int):
        self.f, self.left = f, length

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def named(source: Source) -> str:
    """``source`` for messages: the file's path, or "<N bytes in memory>"."""
    return f"<{source.nbytes} bytes in memory>" if isinstance(source, memoryview) else str(source)


@contextlib.contextmanager
def reading(source: Source) -> Iterator[Any]:
    """A binary reader of ``source`` (``read(n)``); ``FileNotFoundError`` if a local file is absent."""
    if isinstance(source, memoryview):
        yield _ViewReader(source)
        return
    with open(source, "rb") as f:
        yield f


class Store(abc.ABC):
    """Checkpoints of one job at one URL: put files, commit with the manifest, list, read, delete.

    Attributes:
        url: the URL the store was opened with (for messages and logs).
        local_root: for stores that are a local directory, that directory (restore then reads
            it in place instead of downloading); ``None`` for remote stores.
    """

    url: str
    local_root: Path | None = None

    @abc.abstractmethod
    def list_committed(self) -> list[int]:
        """Steps whose manifest is in place and parses, newest first.

        Atomicity: a step appears only after ``commit`` wrote its manifest; files put for a step
        without a manifest (an upload in progress or abandoned) never appear. A missing store
        root lists as ``[]``.
        """

    @abc.abstractmethod
    def read_manifest(self, step: int) -> bytes:
        """The manifest bytes of committed ``step``.

        Raises ``FileNotFoundError`` if ``step`` is not committed. The bytes are returned as
        stored; ``fmt.parse_manifest`` checks them.
        """

    @abc.abstractmethod
    def put_file(self, step: int, name: str, source: Source, size: int, crc32c: int) -> None:
        """Upload ``source`` as file ``name`` of the not yet committed ``step``: a local file, or
        bytes already in memory (a ``memoryview``: an upload straight from a snapshot buffer).

        The bytes are streamed (never copied whole) and their crc32c and size are checked
        against ``crc32c``/``size``; on a mismatch nothing of the file is kept and
        ``CorruptCheckpointError`` is raised. Putting a file again replaces it. Atomicity: the
        file is invisible to readers until the step commits. ``FileNotFoundError`` if a local
        ``source`` does not exist. Raises ``AlreadyCommittedError`` if ``step`` is already
        committed (delete it first).
        """

    @abc.abstractmethod
    def commit(self, step: int, manifest: bytes, keep: int | None = None) -> None:
        """Commit ``step`` by writing its manifest, after checking every listed file was put.

        Atomicity: the manifest is written last and in one piece (one object PUT, or a
        rename); before it lands the step is not committed, after it the step is complete.
        Raises ``CheckpointError`` naming the missing or different files if any file the
        manifest lists was not put with that size. With ``keep``, afterwards deletes all but
        the newest ``keep`` committed steps up to ``step`` (newer ones are never deleted).
        """

    @abc.abstractmethod
    def open_file(self, step: int, name: str) -> BinaryIO:
        """A binary stream of file ``name`` of committed ``step`` (close it after use).

        Raises ``FileNotFoundError`` if ``step`` is not committed or has no such file.
        """

    @abc.abstractmethod
    def delete(self, step: int) -> None:
        """Delete ``step`` (committed or a pending upload).

        Atomicity: the manifest goes first (one delete or rename), so a half-deleted step never
        lists as committed; the other files follow. Raises ``FileNotFoundError`` if the store
        has nothing of ``step``.
        """

    @abc.abstractmethod
    def cleanup(self) -> list[str]:
        """Remove leftovers of uploads that can no longer finish; returns what was removed.

        Only provably abandoned data goes: files of a step that never got a manifest and are
        older than the backend's safety age (an upload still running is never touched).
        Nothing committed is ever removed. A missing store root removes nothing.
        """

    def open_range(self, step: int, name: str, offset: int, length: int) -> BinaryIO:
        """Bytes ``[offset, offset + length)`` of file ``name`` of committed ``step`` as a stream.

        Fewer bytes come back if the file is shorter. Raises ``FileNotFoundError`` like
        ``open_file``. The default seeks in ``open_file``'s stream; backends with a cheaper
        ranged read (HTTP ``Range``) override it.
        """
        f = self.open_file(step, name)
        try:
            f.seek(offset)
        except BaseException:
            f.close()
            raise
        return Limited(f, length)  # type: ignore[return-value]

    def read_pending(self, step: int, name: str) -> bytes:
        """The bytes of file ``name`` put (by any writer) for the not yet committed ``step``.

        Ranks on several hosts use it to assemble one checkpoint in the store: each puts its
        files and then a small part declaration, which rank 0 reads before it commits
        (``stores/assemble.py``). Raises ``FileNotFoundError`` if no such file was put. Stores
        that cannot see other writers' uploads raise ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} ({self.url}) cannot read other writers' pending uploads")

    def download(self, step: int, dest_dir: Path) -> Path:
        """Download committed ``step`` into local checkpoint root ``dest_dir``; returns the step directory.

        Every file is checked (size and crc32c against the manifest) while it streams in; the
        local directory appears under its final name only when complete (atomic rename).
        Raises ``FileNotFoundError`` if ``step`` is not committed and ``CorruptCheckpointError``
        if a file is missing or damaged in the store.
        """
        from .transfer import download

        return download(self, step, dest_dir)

    def retain(self, keep: int, newest: int | None = None) -> list[int]:
        """Delete all but the newest ``keep`` committed steps up to ``newest``; returns the deleted steps.

        Steps newer than ``newest`` (another timeline) are kept. A step that vanishes meanwhile
        is skipped. Each deletion is atomic as ``delete`` is.
        """
        steps = [s for s in self.list_committed() if newest is None or s <= newest]
        dropped = []
        for step in steps[keep:]:
            try:
                self.delete(step)
                dropped.append(step)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a failed cleanup only wastes space
                log.warning("could not delete old checkpoint step %d from %s: %s", step, self.url, exc)
        if dropped:
            log.info("deleted old checkpoint step(s) %s from %s", dropped, self.url)
        return dropped

    def describe(self, step: int) -> str:
        """Where ``step`` lives, for messages: ``<url>/step-XXXXXXXXXX``."""
        return f"{self.url.rstrip('/')}/{fmt.step_dirname(step)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def stored_manifest(raw: bytes, step: int, where: str) -> dict:
    """The parsed manifest read for committed ``step`` at ``where``; ``CorruptCheckpointError`` if it
    does not parse or names another step."""
    try:
        doc = fmt.parse_manifest(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(where, fmt.MANIFEST, f"is not a valid manifest: {exc}") from None
    if doc["step"] != step:
        raise CorruptCheckpointError(where, fmt.MANIFEST, f"names step {doc['step']}, not {step}")
    return doc


def manifest_for_commit(manifest: bytes, step: int, where: str) -> dict:
    """The parsed manifest a ``commit`` of ``step`` was given; ``CheckpointError`` if it is invalid
    or names another step (checked before anything is published)."""
    try:
        doc = fmt.parse_manifest(manifest)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot commit {where}: the manifest is not valid: {exc}") from None
    if doc["step"] != step:
        raise CheckpointError(f"cannot commit {where}: the manifest is for step {doc['step']}")
    return doc


def copy_with_crc(src: BinaryIO, dest: Path, chunk: int = 8 << 20) -> tuple[int, int]:
    """Stream ``src`` into a new file ``dest`` (fsynced); returns (bytes, crc32c) of what was written."""
    crc, n = 0, 0
    with open(dest, "wb") as out:
        while data := src.read(chunk):
            crc = _crc.crc32c(data, crc)
            n += len(data)
            out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return n, crc


def parses(raw: bytes, step: int) -> bool:
    """Whether ``raw`` is a valid manifest of ``step`` (the listing rule on object stores)."""
    try:
        return fmt.parse_manifest(raw)["step"] == step
    except (ValueError, UnicodeDecodeError):
        return False


def check_name(name: str) -> str:
    """Refuse file names that could escape a step's directory (slashes, dots, empty, the manifest)."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name == fmt.MANIFEST or "\x00" in name:
        from ..errors import ConfigError

        raise ConfigError(f"invalid checkpoint file name {name!r}: no slashes, no leading dot, not {fmt.MANIFEST}")
    return name
