"""Ranks on several hosts commit one checkpoint through the store (a URL as checkpoint_dir).

On one host the ranks assemble a checkpoint in a shared directory and rank 0 commits it there
(``core/ranks.py``). Hosts share no directory, so with ranks on several hosts the checkpoint is
assembled in the store instead:

1. every rank writes its files into a private staging directory on its host;
2. it puts them into the store under the step (invisible to readers until the commit), then
   its part declaration ``rank-<r>.part.json``: its files' sizes and checksums, and the
   attempt's tag (job, round, checkpoint number in the round), so a declaration left in the
   store by an earlier attempt at the same step is never taken for this one;
3. rank 0 reads every other rank's declaration from the store (``Store.read_pending``),
   writes the manifest listing all their files and commits it; the store checks that every
   listed file is there with its size (and, for the checkpoint service, its crc32c). Then
   retention runs on the store.

A step that the store already holds committed (an abandoned timeline) is deleted by rank 0
before it puts anything; the other ranks' puts are refused until then, and they retry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c as _crc

from ..errors import AlreadyCommittedError, CheckpointError
from ..ranks import rank_part
from .base import Source, Store, named
from .transfer import commit_manifest, drop_other_timeline, is_transient, retry

log = logging.getLogger("lattice")
Files = dict[str, dict[str, int]]


def assemble(store: Store, tmp: Path, snap: Any, files: Files, manifest_for: Callable[[Files], bytes],
             keep: int | None, timeout: float) -> bool:
    """Put this rank's files of ``snap`` (written in ``tmp``) into ``store``; rank 0 commits.

    Returns True on rank 0 once the checkpoint is committed in the store, False on the other
    ranks once their part is in. Raises ``CheckpointError`` if a rank's part does not arrive
    within ``timeout`` seconds (nothing is committed then).
    """
    ranks, step = snap.ranks, snap.step
    tag = f"job_{ranks.job}_r{ranks.round}_c{snap.seq}"
    deadline = time.monotonic() + timeout
    if ranks.rank == 0:
        drop_other_timeline(store, step)
    for name, info in files.items():
        _put(store, step, name, tmp / name, info, deadline)
    part = json.dumps({"rank": ranks.rank, "tag": tag, "files": files}).encode()
    _put(store, step, rank_part(ranks.rank), memoryview(part), {"size": len(part), "crc32c": _crc.crc32c(part)},
         deadline)
    if ranks.rank != 0:
        return False
    everything = dict(files)
    for other in _wait_parts(store, step, ranks.world, tag, deadline).values():
        everything.update(other)
    commit_manifest(store, step, manifest_for(everything), keep)
    return True


def _put(store: Store, step: int, name: str, source: Source, info: dict[str, int], deadline: float) -> None:
    """Put one file (transient errors retried); while the step is still committed from another
    timeline (rank 0 deletes it first), wait and try again until ``deadline``."""
    delay = 0.05
    while True:
        try:
            retry(f"uploading {named(source)}", lambda: store.put_file(step, name, source, info["size"], info["crc32c"]))
            return
        except AlreadyCommittedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _wait_parts(store: Store, step: int, world: int, tag: str, deadline: float) -> dict[int, Files]:
    """Rank 0: read ranks 1..world-1's declarations of this attempt from the store, backing off to 0.5 s."""
    found: dict[int, Files] = {}
    delay = 0.01
    while True:
        for r in range(1, world):
            if r in found:
                continue
            try:
                doc = json.loads(store.read_pending(step, rank_part(r)))
            except (FileNotFoundError, ValueError):  # not there yet, or not a declaration this code wrote
                continue
            except Exception as exc:
                if not is_transient(exc):
                    raise
                continue
            if isinstance(doc, dict) and doc.get("tag") == tag and isinstance(doc.get("files"), dict):
                found[r] = doc["files"]
        if len(found) == world - 1:
            return found
        if time.monotonic() > deadline:
            missing = [r for r in range(1, world) if r not in found]
            raise CheckpointError(f"{store.describe(step)}: rank(s) {missing[:8]} did not put their part into "
                                  "the store in time; the checkpoint is not committed")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
