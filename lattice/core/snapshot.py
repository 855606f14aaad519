"""Snapshot: copy the registered state into one reusable host buffer, laid out as the data file.

This is the only part of a checkpoint that blocks training. The buffer is allocated on
the first checkpoint and reused while the state keeps its size, so later snapshots are a
plain memory copy; the persist step then writes the buffer to disk as is.

A snapshot is taken in two phases: ``plan`` lays out every part (headers, tree, buffer)
without copying, then ``fill`` copies the arrays in file order. The persist can start
between the two: each part's ``Fill`` is a watermark that the writer waits on, so a region
of the data file is written as soon as the copy has passed it. ``fill`` returns only once
every byte is copied, so nothing aliases *mutable* training memory after ``checkpoint()``
returns. Arrays whose codec can ``freeze`` them (a host view that training can no longer
change: a JAX array on the CPU, whose buffer is never donated while a view exists; a
TensorFlow tensor, which TensorFlow copies on write) are only frozen while training waits;
their copy runs in a background thread that the persist follows like any other.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import numpy as np

from . import fmt
from .arrays import CODECS, Codecs
from .ranks import Ranks, rank_data, rank_tree
from .tree import encode

COPY_CHUNK = 64 << 20
ALIGN = 4096  # the buffer's alignment (O_DIRECT needs the logical block size; 4 KiB covers it)


@dataclasses.dataclass
class Item:
    """One registered object and the adapter that handles it."""

    adapter: Any
    obj: Any


class SnapshotAborted(Exception):
    """The snapshot copy failed, so the persist that waits on it must not commit."""


class Fill:
    """How far the copy has got through one part's buffer; readers wait for a region to be copied."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done = 0
        self._error: BaseException | None = None

    def advance(self, upto: int) -> None:
        with self._cond:
            self._done = upto
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def wait(self, upto: int) -> None:
        """Block until bytes ``[0, upto)`` of the buffer are copied; raise if the copy failed."""
        with self._cond:
            self._cond.wait_for(lambda: self._done >= upto or self._error is not None)
            if self._error is not None:
                raise SnapshotAborted(f"the snapshot copy failed: {type(self._error).__name__}: {self._error}")


@dataclasses.dataclass
class Part:
    """One data file and its tree file, as bytes ready to write."""

    data_name: str
    tree_name: str
    layout: fmt.Layout
    file: np.ndarray  # uint8, the whole data file: the header, then ``data``
    tree: bytes

    @property
    def data(self) -> np.ndarray:
        return self.file[len(self.layout.header):]
    fill: Fill = dataclasses.field(default_factory=Fill)


@dataclasses.dataclass
class Snapshot:
    """Everything the background persist needs; nothing in it aliases live training state."""

    step: int
    wall_time: float
    parts: list[Part]
    adapters: dict[str, str]
    per_rank: set[str]
    ranks: Ranks = dataclasses.field(default_factory=Ranks)
    seq: int = 0  # this process's checkpoint count (multi-rank temp directory names)
    blocking_s: float = 0.0
    copied: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = 0.0  # perf_counter at plan()
    copy_error: BaseException | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.layout.file_size + len(p.tree) for p in self.parts)


class HostBuffer:
    """A reusable, page-aligned uint8 host buffer; grows when needed, shrinks when far too big.

    Page alignment lets the writer send it to the disk with ``O_DIRECT`` (no page-cache copy).
    """

    def __init__(self) -> None:
        self._raw = np.empty(0, dtype=np.uint8)
        self._buf = self._raw

    def get(self, size: int) -> np.ndarray:
        cap = self._buf.size
        if size > cap or cap > 2 * size + (64 << 20):
            self._raw = self._buf = np.empty(0, dtype=np.uint8)  # free before allocating the new one
            self._raw = np.empty(size + ALIGN, dtype=np.uint8)
            skip = -self._raw.ctypes.data % ALIGN
            self._buf = self._raw[skip:skip + size]
        return self._buf[:size]

    @property
    def nbytes(self) -> int:
        return int(self._buf.size)

    def release(self) -> None:
        self._raw = self._buf = np.empty(0, dtype=np.uint8)


class Buffers:
    """One reusable ``HostBuffer`` per data file name."""

    def __init__(self) -> None:
        self._by_name: dict[str, HostBuffer] = {}

    def get(self, name: str, size: int) -> np.ndarray:
        return self._by_name.setdefault(name, HostBuffer()).get(size)

    def release(self) -> None:
        for b in self._by_name.values():
            b.release()


def is_per_rank(item: Item) -> bool:
    return bool(getattr(item.adapter, "per_rank", False))


def _groups(items: dict[str, Item], ranks: Ranks) -> list[tuple[str, str, dict[str, Item]]]:
    """Which items go to which files for this rank (see ``lattice.core.ranks``)."""
    if ranks.world == 1:
        return [(fmt.DATA, fmt.TREE, items)]
    groups = [(rank_data(ranks.rank), rank_tree(ranks.rank), {n: i for n, i in items.items() if is_per_rank(i)})]
    if ranks.rank == 0:
        groups.insert(0, (fmt.DATA, fmt.TREE, {n: i for n, i in items.items() if not is_per_rank(i)}))
    return groups


def plan(items: dict[str, Item], step: int, buffers: Buffers, codecs: Codecs = CODECS,
         ranks: Ranks | None = None) -> Snapshot:
    """Lay out the snapshot of ``items`` at ``step``; nothing is copied until ``fill``."""
    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    parts = [_part(data, tree, group, step, buffers, codecs) for data, tree, group in _groups(items, ranks)]
    adapters = {name: item.adapter.name for name, item in items.items()}
    per_rank = {name for name, item in items.items() if is_per_rank(item)}
    snap = Snapshot(step, time.time(), parts, adapters, per_rank, ranks)
    snap.started = t0
    return snap


def fill(snap: Snapshot) -> None:
    """Copy every array into its part's buffer, advancing each part's watermark as it goes.

    Arrays a codec can freeze are frozen here and copied by a background thread (``snap.copied``
    is set when that is done). On failure the watermarks fail too (a waiting writer aborts) and
    the error is raised. Either way no part keeps a reference to mutable live arrays.
    """
    deferred: list[tuple[Part, fmt.Entry]] = []
    try:
        _prefetch(snap)
        for part in snap.parts:
            data, waiting = part.data, False
            for entry in part.layout.entries:
                frozen = _freeze(entry) if entry.size else None
                if frozen is not None:
                    entry.leaf.value, waiting = frozen, True
                    deferred.append((part, entry))
                    continue
                if entry.size:
                    _copy(entry, data[entry.offset:entry.offset + entry.size], part.fill)
                entry.leaf.value = None  # do not keep training tensors alive
                if not waiting:  # the watermark stops at the first array copied later
                    part.fill.advance(entry.offset + entry.size)
    except BaseException as exc:
        _abort(snap, exc)
        raise
    snap.blocking_s = time.perf_counter() - snap.started
    if not deferred:
        snap.copied.set()
        return
    threading.Thread(target=_fill_deferred, args=(snap, deferred), name="lattice-copy", daemon=True).start()


def _prefetch(snap: Snapshot) -> None:
    """Let codecs start every array's copy to the host at once (``codec.prefetch``: accelerator
    arrays), so the copies below wait on transfers already under way instead of one at a time."""
    for part in snap.parts:
        for entry in part.layout.entries:
            prefetch = getattr(entry.leaf.codec, "prefetch", None)
            if prefetch is not None and entry.size:
                prefetch(entry.leaf.value)


def _freeze(entry: fmt.Entry) -> Any:
    freeze = getattr(entry.leaf.codec, "freeze", None)
    return freeze(entry.leaf.value) if freeze is not None else None


def _fill_deferred(snap: Snapshot, deferred: list[tuple[Part, fmt.Entry]]) -> None:
    """Copy the frozen arrays, then move each part's watermark over everything copied."""
    later = {id(e) for _, e in deferred}
    try:
        for part in snap.parts:
            for entry in part.layout.entries:
                if id(entry) in later:
                    src = np.ascontiguousarray(entry.leaf.value).reshape(-1).view(np.uint8)
                    np.copyto(part.data[entry.offset:entry.offset + entry.size], src)
                    entry.leaf.value = None
                part.fill.advance(entry.offset + entry.size)
    except BaseException as exc:  # the persist aborts; nothing is committed
        _abort(snap, exc)
        return
    snap.copied.set()


def _abort(snap: Snapshot, exc: BaseException) -> None:
    for part in snap.parts:
        part.fill.fail(exc)
        for entry in part.layout.entries:
            entry.leaf.value = None
    snap.copy_error = exc
    snap.copied.set()


def _copy(entry: fmt.Entry, dst: np.ndarray, progress: Fill) -> None:
    """Copy one array; a large host array goes in chunks so the writer can follow closely."""
    leaf = entry.leaf
    src = leaf.codec.byte_view(leaf.value) if entry.size > 2 * COPY_CHUNK else None
    if src is None or src.size != entry.size:
        leaf.codec.copy_into(leaf.value, dst)
        return
    for i in range(0, entry.size, COPY_CHUNK):
        np.copyto(dst[i:i + COPY_CHUNK], src[i:i + COPY_CHUNK])
        progress.advance(entry.offset + min(i + COPY_CHUNK, entry.size))


def _part(data_name: str, tree_name: str, items: dict[str, Item], step: int, buffers: Buffers,
          codecs: Codecs) -> Part:
    trees: dict[str, Any] = {}
    named, taken = [], set()
    for name, item in items.items():
        skeleton, leaves = encode(item.adapter.save(item.obj), codecs, item=name)
        names = [fmt.tensor_name(name, leaf, taken) for leaf in leaves]
        named.extend(zip(names, leaves, strict=True))
        trees[name] = {"adapter": item.adapter.name, "tree": skeleton, "arrays": names}
    layout = fmt.plan_layout(named, {"format": fmt.FORMAT, "step": str(step)})
    file = buffers.get(data_name, layout.file_size)
    file[:len(layout.header)] = np.frombuffer(layout.header, dtype=np.uint8)
    tree = json.dumps({"items": trees}, separators=(",", ":")).encode()
    return Part(data_name, tree_name, layout, file, tree)
