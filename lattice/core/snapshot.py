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
from .tree import encode


@dataclasses.dataclass
class Item:
    """One registered object and the adapter that handles it."""

    adapter: Any
    obj: Any


@dataclasses.dataclass
class Snapshot:
    """Everything the background persist needs; nothing in it aliases live training state."""

    step: int
    wall_time: float
    layout: fmt.Layout
    data: np.ndarray  # uint8, layout.data_size bytes
    tree: bytes
    adapters: dict[str, str]
    blocking_s: float = 0.0


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


def take(items: dict[str, Item], step: int, buffer: HostBuffer, codecs: Codecs = CODECS) -> Snapshot:
    """Snapshot ``items`` at ``step`` into ``buffer`` (which must not be in use by a persist)."""
    t0 = time.perf_counter()
    trees: dict[str, Any] = {}
    named, taken = [], set()
    for name, item in items.items():
        skeleton, leaves = encode(item.adapter.save(item.obj), codecs, item=name)
        names = [fmt.tensor_name(name, leaf, taken) for leaf in leaves]
        named.extend(zip(names, leaves, strict=True))
        trees[name] = {"adapter": item.adapter.name, "tree": skeleton, "arrays": names}
    layout = fmt.plan_layout(named, {"format": fmt.FORMAT, "step": str(step)})
    data = buffer.get(layout.data_size)
    for entry in layout.entries:
        if entry.size:
            leaf = entry.leaf
            leaf.codec.copy_into(leaf.value, data[entry.offset:entry.offset + entry.size])
        entry.leaf.value = None  # do not keep training tensors alive
    tree = json.dumps({"items": trees}, separators=(",", ":")).encode()
    adapters = {name: item.adapter.name for name, item in items.items()}
    snap = Snapshot(step, time.time(), layout, data, tree, adapters)
    snap.blocking_s = time.perf_counter() - t0
    return snap
