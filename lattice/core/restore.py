"""Restore: the newest committed checkpoint that verifies, read straight into the registered objects.

Array data is read from the data file directly into the registered objects' own memory
where shape and dtype match (no intermediate copy), while a second thread checks the
crc32c of every byte. A missing, truncated or corrupt file raises
``CorruptCheckpointError``; the caller then falls back to the previous checkpoint.
A shape, dtype, key or adapter mismatch is the user's to fix and is raised at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import mmap
import os
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
CHUNK = 64 << 20


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


def read_data(path: Path, manifest: dict[str, Any], plan_for: Any, name: str = fmt.DATA) -> _Plan:
    """Map a data file, build the plan with ``plan_for(header)``, copy and verify every byte.

    The file is memory-mapped and walked in ``CHUNK`` windows: the main thread copies each
    window's arrays into their destinations while a second thread checksums the window
    before it, then drops it from this process's mapping (it stays in the page cache), so
    resident memory does not grow with the file.
    """
    if name not in manifest["files"]:
        raise CorruptCheckpointError(str(path), name, "is not listed in the manifest")
    expect = manifest["files"][name]
    with open(path / name, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8 or size != expect["size"]:
            raise CorruptCheckpointError(str(path), name, f"has a bad size: {size} bytes, manifest says {expect['size']}")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        src = np.frombuffer(mapped, dtype=np.uint8)
        try:
            header, start = fmt.read_header(bytes(src[:8]), lambda n: bytes(src[8:8 + n]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(str(path), name, f"has a bad header: {exc}") from None
        plan = plan_for(header)
        value = _copy_and_check(mapped, src, start, plan.reads, f"restore {path.name}", (path, name))
    finally:
        src = None  # the mapping goes once nothing refers to it
    if value != expect["crc32c"]:
        raise CorruptCheckpointError(str(path), name, "crc32c mismatch (the file is corrupt)")
    return plan


def _copy_and_check(mapped: mmap.mmap, src: np.ndarray, start: int, reads: list[_Read], label: str,
                    where: tuple[Path, str]) -> int:
    """Copy ``reads`` (offsets from ``start``) out of ``src`` window by window; returns the file's crc32c."""
    pending = _ordered(reads, start, src.size, where)
    crc = _Crc(0)

    def check(begin: int, end: int) -> None:
        crc.add(src[begin:end])
        try:
            mapped.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError):
            pass  # only a hint: the pages stay mapped

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lattice-crc") as pool, \
            Progress(label, src.size) as progress:
        jobs = []
        for begin in range(0, src.size, CHUNK):
            end = min(begin + CHUNK, src.size)
            while pending and pending[0][0] < end:
                a, b, view = pending[0]
                lo, hi = max(a, begin), min(b, end)
                np.copyto(view[lo - a:hi - a], src[lo:hi])
                if b > end:
                    break
                pending.popleft()
            jobs.append(pool.submit(check, begin, end))
            progress.update(end - begin)
        for job in jobs:
            job.result()
    return crc.value


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


class _Crc:
    def __init__(self, value: int):
        self.value = value

    def add(self, data: Any) -> None:
        self.value = crc32c.crc32c(data, self.value)


def restore_from(path: Path, items: dict[str, Item], codecs: Codecs = CODECS,
                 ranks: Ranks | None = None) -> Restored:
    """Verify checkpoint ``path`` and load it into ``items`` (raises CorruptCheckpointError).

    With several ranks, each rank also verifies the other ranks' per-rank files, so every
    rank reaches the same verdict on every checkpoint and all restore the same step.
    """
    ranks = ranks or Ranks()
    manifest = read_manifest(path)
    check_sizes(path, manifest)
    per_rank = {n for n, i in items.items() if getattr(i.adapter, "per_rank", False)}
    plan_sources, others = sources(manifest, list(items), per_rank, ranks)
    for name in others:
        verify_file(path, manifest, name)
    objects: dict[str, Any] = {}
    for source in plan_sources:
        objects.update(_restore_source(path, manifest, source, items, codecs))
    missing = [n for n in items if n not in objects]
    return Restored(manifest["step"], path, float(manifest.get("wall_time", 0.0)), objects, missing)


def _restore_source(path: Path, manifest: dict[str, Any], source: Source, items: dict[str, Item],
                    codecs: Codecs) -> dict[str, Any]:
    saved = read_tree(path, manifest, source.tree)
    wanted = {name: items[name] for name in source.items if name in saved}
    for name, item in wanted.items():
        _check_adapter(name, item, saved[name]["adapter"], path)

    def plan_for(header: dict[str, Any]) -> _Plan:
        plan = _Plan(path, header, codecs, source.data)
        for name, item in wanted.items():
            plan.add_item(name, saved[name], live_arrays(item.adapter.save(item.obj), codecs))
        return plan

    plan = read_data(path, manifest, plan_for, source.data)
    objects = {}
    for name, item in wanted.items():
        values = plan.values[name]
        tree = decode(saved[name]["tree"], lambda node, v=values: _resolve(v[node["$array"]]))
        objects[name] = item.adapter.load(item.obj, tree)
    return objects


def verify_file(path: Path, manifest: dict[str, Any], name: str) -> None:
    """Check one file's crc32c against the manifest (read in chunks, nothing loaded)."""
    info = manifest["files"].get(name)
    if info is None:
        raise CorruptCheckpointError(str(path), name, "is not listed in the manifest")
    crc = 0
    with open(path / name, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            crc = crc32c.crc32c(chunk, crc)
    if crc != info["crc32c"]:
        raise CorruptCheckpointError(str(path), name, "crc32c mismatch (the file is corrupt)")


def _check_adapter(name: str, item: Item, recorded: str, path: Path) -> None:
    if item.adapter.name != recorded:
        raise StateMismatchError(
            f"item {name!r} was saved by adapter {recorded!r} but the registered object is handled "
            f"by {item.adapter.name!r} (checkpoint: {path}); register the same kind of object"
        )
