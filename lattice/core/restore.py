"""Restore: the newest committed checkpoint that verifies, read straight into the registered objects.

Array data is read from the data file directly into the registered objects' own memory
where shape and dtype match (no intermediate copy, one thread per part of the file), and the
crc32c of every byte is checked. A missing, truncated or corrupt file raises
``CorruptCheckpointError``; the caller then falls back to the previous checkpoint.
A shape, dtype, key or adapter mismatch is the user's to fix and is raised at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from . import fmt
from .arrays import CODECS, DTYPES, Codecs, nbytes
from .errors import CorruptCheckpointError, StateMismatchError
from .progress import Progress
from .ranks import Ranks, Source, sources
from .snapshot import Item
from .tree import array_nodes, decode, live_arrays, path_str

log = logging.getLogger("lattice")
CHUNK = 64 << 20  # verify_file's read size
BLOCK = 1 << 20  # restore: read, then checksum while in cache
THREADS = 4  # restore: at most this many reader threads (and no more than the CPUs)
MIN_PART = 64 << 20  # ... and no more than one per this many bytes


@dataclasses.dataclass
class Restored:
    """What a restore produced: the step, where from, and each item's restored object."""

    step: int
    path: Path
    wall_time: float
    objects: dict[str, Any]
    missing: list[str]  # registered items that the checkpoint does not have


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        raw = (path / fmt.MANIFEST).read_bytes()
    except OSError as exc:
        raise CorruptCheckpointError(str(path), fmt.MANIFEST, f"cannot be read: {exc.strerror or exc}") from None
    try:
        return fmt.parse_manifest(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(str(path), fmt.MANIFEST, f"is not a valid manifest: {exc}") from None


def check_sizes(path: Path, manifest: dict[str, Any]) -> None:
    for name, info in manifest["files"].items():
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpointError(str(path), name, "is missing") from None
        if size != info["size"]:
            what = "truncated" if size < info["size"] else "longer than written"
            raise CorruptCheckpointError(str(path), name, f"is {what}: {size} bytes, manifest says {info['size']}")


def read_tree(path: Path, manifest: dict[str, Any], name: str = fmt.TREE) -> dict[str, Any]:
    if name not in manifest["files"]:
        raise CorruptCheckpointError(str(path), name, "is not listed in the manifest")
    raw = (path / name).read_bytes()
    if crc32c.crc32c(raw) != manifest["files"][name]["crc32c"]:
        raise CorruptCheckpointError(str(path), name, "crc32c mismatch (the file is corrupt)")
    try:
        doc = json.loads(raw)
        return doc["items"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(str(path), name, f"is not valid: {exc}") from None


@dataclasses.dataclass
class _Read:
    offset: int
    size: int
    view: np.ndarray  # uint8 destination


class _Plan:
    """Where every array of the wanted items goes, checked against the file's header."""

    def __init__(self, path: Path, header: dict[str, Any], codecs: Codecs, data: str = fmt.DATA):
        self.path, self.header, self.codecs, self.data = path, header, codecs, data
        self.reads: list[_Read] = []
        self.values: dict[str, list[Any]] = {}

    def add_item(self, name: str, entry: dict[str, Any], live: dict[tuple, Any]) -> None:
        arrays = entry.get("arrays", [])
        values: list[Any] = [None] * len(arrays)
        for path, node in array_nodes(entry["tree"]):
            tensor = arrays[node["$array"]]
            dtype, shape = node["dtype"], tuple(node["shape"])
            begin, end = self._locate(tensor, dtype, shape)
            value, view = self._destination(name, path, dtype, shape, node, live.get(path))
            values[node["$array"]] = value
            if end > begin:
                self.reads.append(_Read(begin, end - begin, view))
        self.values[name] = values

    def _locate(self, tensor: str, dtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
        info = self.header.get(tensor)
        if not isinstance(info, dict) or dtype not in DTYPES:
            raise CorruptCheckpointError(str(self.path), self.data, f"has no valid entry for tensor {tensor!r}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CorruptCheckpointError(str(self.path), self.data, f"has no valid data_offsets for tensor {tensor!r}")
        begin, end = offsets
        if begin < 0 or end - begin != nbytes(dtype, shape):
            raise CorruptCheckpointError(str(self.path), self.data, f"tensor {tensor!r} has the wrong size")
        return begin, end

    def _destination(self, item: str, path: tuple, dtype: str, shape: tuple[int, ...],
                     node: dict[str, Any], target: Any) -> tuple[Any, np.ndarray]:
        if target is not None:
            codec = self.codecs.find(target)
            tdtype, tshape = codec.describe(target)
            if (tdtype, tshape) != (dtype, shape):
                raise StateMismatchError(
                    f"item {item!r}, key {path_str(path)!r}: the checkpoint has shape {list(shape)} "
                    f"{dtype}, the registered object has shape {list(tshape)} {tdtype} (checkpoint: {self.path})"
                )
            view = codec.byte_view(target)
            if view is not None:
                return target, view
        codec = self.codecs.by_kind(node.get("kind", "numpy")) or self.codecs.by_kind("numpy")
        value = codec.empty(dtype, shape)
        view = codec.byte_view(value)
        if node.get("scalar"):
            return _Scalar(value), view
        return value, view


class _Scalar:
    """A numpy scalar being restored: read into a 0-d array, unwrapped when the tree is rebuilt."""

    def __init__(self, array: np.ndarray):
        self.array = array


def _resolve(value: Any) -> Any:
    return value.array[()] if isinstance(value, _Scalar) else value


def read_data(path: Path, manifest: dict[str, Any], plan_for: Any, name: str = fmt.DATA,
              check: bool = True) -> _Plan:
    """Read a data file, build the plan with ``plan_for(header)``, read and verify every byte
    (``check=False``: sizes and header only, for data already verified where it lies).

    The arrays are read with ``preadv`` straight into their destinations (one copy out of the
    page cache, no mapping, no intermediate buffer). The file is split into one contiguous part
    per thread (up to ``THREADS``, each with its own descriptor, so readahead sees a sequential
    stream); each thread reads its part in ``BLOCK`` pieces and checksums every piece right
    after reading it, while it is still in cache. The parts' crc32c values are then combined
    into the file's and compared with the manifest.
    """
    if name not in manifest["files"]:
        raise CorruptCheckpointError(str(path), name, "is not listed in the manifest")
    expect = manifest["files"][name]
    file = path / name
    with open(file, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8 or size != expect["size"]:
            raise CorruptCheckpointError(str(path), name, f"has a bad size: {size} bytes, manifest says {expect['size']}")
        try:
            header, start = fmt.read_header(os.pread(f.fileno(), 8, 0), lambda n: os.pread(f.fileno(), n, 8))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(str(path), name, f"has a bad header: {exc}") from None
    plan = plan_for(header)
    value = _read_and_check(file, size, start, plan.reads, f"restore {path.name}", (path, name), check)
    if check and value != expect["crc32c"]:
        raise CorruptCheckpointError(str(path), name, "crc32c mismatch (the file is corrupt)")
    return plan


def _threads(size: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(THREADS, cpus, size // MIN_PART))


def _read_and_check(file: Path, size: int, start: int, reads: list[_Read], label: str,
                    where: tuple[Path, str], check: bool = True) -> int:
    """Read ``reads`` (offsets from ``start``) out of ``file`` into their views; returns the file's crc32c.

    Every byte of the file is checksummed, including the header and any gaps between arrays
    (read into a scratch buffer); with ``check=False`` nothing is (the result is then 0).
    """
    pieces = _cover(_ordered(reads, start, size, where), size)
    n = _threads(size)
    cuts = [0] + [(size * i // n) & ~(BLOCK - 1) for i in range(1, n)] + [size]
    lock = threading.Lock()

    with Progress(label, size) as progress:

        def part(lo: int, hi: int) -> int:
            crc, scratch = 0, None
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_SEQUENTIAL)
                for a, b, view in pieces:
                    pos, stop = max(a, lo), min(b, hi)
                    while pos < stop:
                        end = min(pos + BLOCK, stop)
                        if view is None:
                            if scratch is None:
                                scratch = np.empty(BLOCK, dtype=np.uint8)
                            buf = scratch[:end - pos]
                        else:
                            buf = view[pos - a:end - a]
                        if os.preadv(fd, [buf], pos) != end - pos:
                            raise CorruptCheckpointError(str(where[0]), where[1], "ends early (truncated)")
                        if check:
                            crc = crc32c.crc32c(buf, crc)
                        with lock:
                            progress.update(end - pos)
                        pos = end
            finally:
                os.close(fd)
            return crc

        if n == 1:
            return part(0, size)
        with concurrent.futures.ThreadPoolExecutor(n - 1, thread_name_prefix="lattice-read") as pool:
            jobs = [pool.submit(part, cuts[i], cuts[i + 1]) for i in range(1, n)]
            try:
                crcs = [part(cuts[0], cuts[1])]
            finally:
                concurrent.futures.wait(jobs)
            crcs += [job.result() for job in jobs]
    value = crcs[0]
    for i in range(1, n):
        value = crc32c_combine(value, crcs[i], cuts[i + 1] - cuts[i])
    return value


def _cover(reads: collections.deque[tuple[int, int, np.ndarray]],
           size: int) -> list[tuple[int, int, np.ndarray | None]]:
    """``reads`` plus the stretches between them (``None``: read into scratch), covering the whole file."""
    out: list[tuple[int, int, np.ndarray | None]] = []
    pos = 0
    for a, b, view in reads:
        if a > pos:
            out.append((pos, a, None))
        out.append((a, b, view))
        pos = b
    if pos < size:
        out.append((pos, size, None))
    return out


def _ordered(reads: list[_Read], start: int, size: int,
             where: tuple[Path, str]) -> collections.deque[tuple[int, int, np.ndarray]]:
    """The reads as (begin, end, destination) in file order; overlaps and overruns are corruption."""
    out: collections.deque[tuple[int, int, np.ndarray]] = collections.deque()
    pos = start
    for r in sorted(reads, key=lambda r: r.offset):
        a, b = start + r.offset, start + r.offset + r.size
        if a < pos:
            raise CorruptCheckpointError(str(where[0]), where[1], "tensors overlap in the data file")
        if b > size:
            raise CorruptCheckpointError(str(where[0]), where[1], "ends early (truncated)")
        out.append((a, b, r.view))
        pos = b
    return out


_POLY = 0x82F63B78  # crc32c, reflected


def _mulmod(a: int, b: int) -> int:
    """a * b modulo the crc32c polynomial (reflected bit order)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(63):
    _X2N.append(_mulmod(_X2N[-1], _X2N[-1]))


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """The crc32c of A + B from crc32c(A), crc32c(B) and len(B) (as zlib's crc32_combine)."""
    p, k, n = 1 << 31, 3, len2  # x^(8 * len2): bits, so start at 2^3
    while n:
        if n & 1:
            p = _mulmod(_X2N[k], p)
        n >>= 1
        k += 1
    return _mulmod(p, crc1) ^ crc2


def restore_from(path: Path, items: dict[str, Item], codecs: Codecs = CODECS,
                 ranks: Ranks | None = None, verified: bool = False) -> Restored:
    """Verify checkpoint ``path`` and load it into ``items`` (raises CorruptCheckpointError).

    With several ranks, each rank also verifies the other ranks' per-rank files, so every
    rank reaches the same verdict on every checkpoint and all restore the same step.
    ``verified``: every byte was already checked against the manifest where the files lie
    (a memory-tier checkpoint the agent uploaded, ``tiers.verified``): sizes, headers and the
    manifest are still checked, the data's crc32c is not computed again.
    """
    ranks = ranks or Ranks()
    manifest = read_manifest(path)
    check_sizes(path, manifest)
    per_rank = {n for n, i in items.items() if getattr(i.adapter, "per_rank", False)}
    plan_sources, others = sources(manifest, list(items), per_rank, ranks)
    for name in () if verified else others:
        verify_file(path, manifest, name)
    objects: dict[str, Any] = {}
    for source in plan_sources:
        objects.update(_restore_source(path, manifest, source, items, codecs, check=not verified))
    missing = [n for n in items if n not in objects]
    return Restored(manifest["step"], path, float(manifest.get("wall_time", 0.0)), objects, missing)


def _restore_source(path: Path, manifest: dict[str, Any], source: Source, items: dict[str, Item],
                    codecs: Codecs, check: bool = True) -> dict[str, Any]:
    saved = read_tree(path, manifest, source.tree)
    wanted = {name: items[name] for name in source.items if name in saved}
    for name, item in wanted.items():
        _check_adapter(name, item, saved[name]["adapter"], path)

    def plan_for(header: dict[str, Any]) -> _Plan:
        plan = _Plan(path, header, codecs, source.data)
        for name, item in wanted.items():
            plan.add_item(name, saved[name], live_arrays(item.adapter.save(item.obj), codecs))
        return plan

    plan = read_data(path, manifest, plan_for, source.data, check)
    objects = {}
    for name, item in wanted.items():
        values = plan.values[name]
        tree = decode(saved[name]["tree"], lambda node, v=values: _resolve(v[node["$array"]]))
        objects[name] = item.adapter.load(item.obj, tree)
    return objects


def verify_file(path: Path, manifest: dict[str, Any], name: str, progress: bool = False) -> None:
    """Check one file's crc32c against the manifest (read in chunks, nothing loaded);
    with ``progress``, files of 1 GiB or more show a progress line."""
    info = manifest["files"].get(name)
    if info is None:
        raise CorruptCheckpointError(str(path), name, "is not listed in the manifest")
    crc = 0
    threshold = (1 << 30) if progress else 1 << 62
    with open(path / name, "rb", buffering=0) as f, \
            Progress(f"verify {path.name}/{name}", info["size"], threshold=threshold) as bar:
        while chunk := f.read(CHUNK):
            crc = crc32c.crc32c(chunk, crc)
            bar.update(len(chunk))
    if crc != info["crc32c"]:
        raise CorruptCheckpointError(str(path), name, "crc32c mismatch (the file is corrupt)")


def _check_adapter(name: str, item: Item, recorded: str, path: Path) -> None:
    if item.adapter.name != recorded:
        raise StateMismatchError(
            f"item {name!r} was saved by adapter {recorded!r} but the registered object is handled "
            f"by {item.adapter.name!r} (checkpoint: {path}); register the same kind of object"
        )
