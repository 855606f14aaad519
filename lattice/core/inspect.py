"""Read-only views of a checkpoint directory for ``lattice ckpt``: list, describe, verify."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from . import fmt
from .errors import ConfigError, CorruptCheckpointError
from .restore import check_sizes, read_manifest, read_tree, verify_file
from .storage import CORRUPT_TAG, TMP_TAG, LocalDirectory


@dataclasses.dataclass
class Listing:
    committed: list[tuple[int, Path]]
    latest: str | None
    other: list[str]  # temporary, damaged and unknown entries


def listing(root: str | os.PathLike[str]) -> Listing:
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is not a directory")
    store = LocalDirectory(path)
    latest_file = path / fmt.LATEST
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    committed = store.committed()
    names = {p.name for _, p in committed}
    other = sorted(n for n in os.listdir(path) if n not in names and n != fmt.LATEST
                   and (n.startswith(fmt.STEP_PREFIX) or TMP_TAG in n or CORRUPT_TAG in n))
    return Listing(committed, latest, other)


def find(root: str | os.PathLike[str], step: int | None) -> Path:
    """The checkpoint directory of ``step`` (newest committed if ``None``)."""
    committed = listing(root).committed
    if not committed:
        raise ConfigError(f"no committed checkpoint in {str(root)!r}")
    if step is None:
        return committed[0][1]
    for s, p in committed:
        if s == step:
            return p
    raise ConfigError(f"no committed checkpoint of step {step} in {str(root)!r}; steps: {[s for s, _ in committed]}")


def describe(path: Path) -> dict[str, Any]:
    """Manifest, items (with adapters) and tensors (name, dtype, shape, bytes) of one checkpoint.

    With several ranks, per-rank tensors are listed as ``rank-<r>.safetensors:<name>``.
    """
    manifest = read_manifest(path)
    tensors: dict[str, Any] = {}
    items: dict[str, Any] = {}
    for data in sorted(n for n in manifest["files"] if n.endswith(".safetensors")):
        with open(path / data, "rb") as f:
            header, _ = fmt.read_header(f.read(8), f.read)
        prefix = "" if data == fmt.DATA else f"{data}:"
        part = {k: v for k, v in header.items() if k != "__metadata__"}
        tensors.update({prefix + k: v for k, v in part.items()})
        tree_name = fmt.TREE if data == fmt.DATA else data.replace(".safetensors", ".json")
        for name, entry in read_tree(path, manifest, tree_name).items():
            arrays = entry.get("arrays", [])
            size = sum(part[a]["data_offsets"][1] - part[a]["data_offsets"][0] for a in arrays if a in part)
            key = name if data == fmt.DATA else f"{name} ({data.split('.')[0]})"
            items[key] = {"adapter": entry["adapter"], "tensors": len(arrays), "bytes": size}
    return {"path": str(path), "manifest": manifest, "items": items, "tensors": tensors}


def verify(path: Path, progress: bool = True) -> None:
    """Check every file's size and crc32c and the tree/header consistency; raise on damage."""
    manifest = read_manifest(path)
    check_sizes(path, manifest)
    for name in manifest["files"]:
        verify_file(path, manifest, name, progress)
    tree = read_tree(path, manifest)
    with open(path / fmt.DATA, "rb") as f:
        try:
            header, _ = fmt.read_header(f.read(8), f.read)
        except (ValueError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(str(path), fmt.DATA, f"has a bad header: {exc}") from None
    for item, entry in tree.items():
        for tensor in entry.get("arrays", []):
            if tensor not in header:
                raise CorruptCheckpointError(str(path), fmt.DATA, f"lacks tensor {tensor!r} of item {item!r}")
