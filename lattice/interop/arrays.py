"""Read a Lattice checkpoint's arrays as numpy, whatever framework wrote them.

The data files are safetensors and ``tree.json`` records each array's real dtype and shape,
so numpy (plus ``ml_dtypes`` for bfloat16 / float8 / int4) is all that is needed: torch,
TensorFlow and JAX are never imported. Every byte is checked against the manifest's crc32c
while it is read, as a restore does.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core import fmt, inspect
from ..core.arrays import Codecs
from ..core.errors import ConfigError
from ..core.ranks import rank_data, rank_tree
from ..core.restore import _Plan, _Scalar, check_sizes, read_data, read_manifest, read_tree
from ..core.tree import decode


@dataclasses.dataclass
class SavedItem:
    """One item of a checkpoint: its adapter, its tree (arrays as numpy) and its named arrays."""

    adapter: str
    tree: Any
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass
class Checkpoint:
    """What ``read_checkpoint`` found: the step, the directory and every item read."""

    step: int
    path: Path
    items: dict[str, SavedItem]


def _files(manifest: dict[str, Any], rank: int | None) -> list[tuple[str, str]]:
    files = [(fmt.DATA, fmt.TREE)]
    world = int(manifest.get("world_size", 1))
    if rank is None or world == 1:
        return files
    if not 0 <= rank < world:
        raise ConfigError(f"rank={rank} is not a rank of this checkpoint (it was written by {world} ranks)")
    return files + [(rank_data(rank), rank_tree(rank))]


def _read_part(path: Path, manifest: dict[str, Any], data: str, tree: str) -> dict[str, SavedItem]:
    saved = read_tree(path, manifest, tree)
    numpy_only = Codecs()  # every array becomes a numpy array, whatever wrote it

    def plan_for(header: dict[str, Any]) -> _Plan:
        plan = _Plan(path, header, numpy_only, data)
        for name, entry in saved.items():
            plan.add_item(name, entry, {})
        return plan

    plan = read_data(path, manifest, plan_for, data)
    out = {}
    for name, entry in saved.items():
        values = [v.array if isinstance(v, _Scalar) else v for v in plan.values[name]]
        tree_value = decode(entry["tree"], lambda node, v=values: v[node["$array"]])
        out[name] = SavedItem(entry["adapter"], tree_value, dict(zip(entry.get("arrays", []), values, strict=True)))
    return out


def read_checkpoint(directory: str | os.PathLike[str], step: int | None = None, *,
                    rank: int | None = None) -> Checkpoint:
    """Read every item of a committed checkpoint (newest if ``step`` is ``None``) as numpy.

    With several ranks, shared items come from ``data.safetensors``; ``rank=r`` adds rank
    ``r``'s per-rank items (RNG states, data positions). Raises ``ConfigError`` if there is no
    such checkpoint and ``CorruptCheckpointError`` if a file does not match its checksum.
    """
    path = inspect.find(directory, step)
    manifest = read_manifest(path)
    check_sizes(path, manifest)
    items: dict[str, SavedItem] = {}
    for data, tree in _files(manifest, rank):
        items.update(_read_part(path, manifest, data, tree))
    return Checkpoint(int(manifest["step"]), path, items)


def load_arrays(directory: str | os.PathLike[str], step: int | None = None, *,
                rank: int | None = None, internal: bool = False) -> dict[str, np.ndarray]:
    """Every array of a Lattice checkpoint as numpy, keyed by its tensor name (``model/fc.weight``).

    No framework is imported. ``step``: that committed step (default: the newest). ``rank``: with
    a multi-rank checkpoint, also that rank's per-rank arrays. ``internal``: also the arrays of
    Lattice's own items (``__rng__``...). Numpy scalars come back as 0-d arrays.
    """
    ckpt = read_checkpoint(directory, step, rank=rank)
    out: dict[str, np.ndarray] = {}
    for name, item in ckpt.items.items():
        if internal or not name.startswith("_"):
            out.update(item.arrays)
    return out
