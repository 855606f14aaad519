"""Helpers shared by the storage tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lattice.core import fmt
from lattice.core.stores.base import Store


@dataclasses.dataclass
class Backend:
    """One store under test plus a way to damage what it holds (as a disk or bucket fault would)."""

    name: str
    url: str
    store: Store
    overwrite: Callable[[int, str, bytes], None]  # (step, file, new bytes) behind the store's back


def make_checkpoint(root: Path, step: int, payload: bytes | None = None, tree: bytes = b'{"items": {}}') -> Path:
    """A committed local checkpoint ``root/step-N`` (files + manifest); the store does not care what the bytes mean."""
    import crc32c

    path = root / fmt.step_dirname(step)
    path.mkdir(parents=True)
    data = payload if payload is not None else os.urandom(64 << 10) + step.to_bytes(8, "little")
    files: dict[str, dict[str, Any]] = {}
    for name, raw in ((fmt.DATA, data), (fmt.TREE, tree)):
        (path / name).write_bytes(raw)
        files[name] = {"size": len(raw), "crc32c": crc32c.crc32c(raw)}
    (path / fmt.MANIFEST).write_bytes(fmt.manifest(step, time.time(), files, {}))
    return path
