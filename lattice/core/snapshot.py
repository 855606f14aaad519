"""Snapshot: copy the registered state into one reusable host buffer, laid out as the data file.

This is the only part of a checkpoint that blocks training. The buffer is allocated on
the first checkpoint and reused while the state keeps its size, so later snapshots are a
plain memory copy; the persist step then writes the buffer to disk as is.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np

from . import fmt
from .arrays import CODECS, Codecs
from .ranks import Ranks, rank_data, rank_tree
from .tree import encode


@dataclasses.dataclass
class Item:
    """One registered object and the adapter that handles it."""

    adapter: Any
    obj: Any


@dataclasses.dataclass
class Part:
    """One data file and its tree file, as bytes ready to write."""

    data_name: str
    tree_name: str
    layout: fmt.Layout
    data: np.ndarray  # uint8, layout.data_size bytes
    tree: bytes


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

    @property
    def nbytes(self) -> int:
        return sum(p.layout.file_size + len(p.tree) for p in self.parts)


class HostBuffer:
    """A reusable uint8 host buffer; grows when needed, shrinks when far too big."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)

    def get(self, size: int) -> np.ndarray:
        cap = self._buf.size
        if size > cap or cap > 2 * size + (64 << 20):
            self._buf = np.empty(0, dtype=np.uint8)  # free before allocating the new one
            self._buf = np.empty(size, dtype=np.uint8)
        return self._buf[:size]

    @property
    def nbytes(self) -> int:
        return int(self._buf.size)

    def release(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)


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


def take(items: dict[str, Item], step: int, buffers: Buffers, codecs: Codecs = CODECS,
         ranks: Ranks | None = None) -> Snapshot:
    """Snapshot ``items`` at ``step`` into ``buffers`` (which must not be in use by a persist)."""
    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    parts = [_part(data, tree, group, step, buffers, codecs) for data, tree, group in _groups(items, ranks)]
    adapters = {name: item.adapter.name for name, item in items.items()}
    per_rank = {name for name, item in items.items() if is_per_rank(item)}
    snap = Snapshot(step, time.time(), parts, adapters, per_rank, ranks)
    snap.blocking_s = time.perf_counter() - t0
    return snap


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
    data = buffers.get(data_name, layout.data_size)
    for entry in layout.entries:
        if entry.size:
            leaf = entry.leaf
            leaf.codec.copy_into(leaf.value, data[entry.offset:entry.offset + entry.size])
        entry.leaf.value = None  # do not keep training tensors alive
    tree = json.dumps({"items": trees}, separators=(",", ":")).encode()
    return Part(data_name, tree_name, layout, data, tree)
