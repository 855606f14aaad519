"""Checkpoints of a job with several worker processes (ranks).

Who writes what: replicated state (a DDP model and optimizer; every adapter by default) is
written once, by rank 0, to ``data.safetensors``/``tree.json``; per-rank state (adapters
with ``per_rank = True``: RNG states, data-loader positions) is written by every rank to
``rank-<r>.safetensors``/``rank-<r>.json``. All ranks write into one temporary directory
named after the step, the job, the round and the checkpoint's sequence number in the
round, so they agree on it without talking. Each
rank then writes ``rank-<r>.part.json`` (its files' sizes and checksums) durably; rank 0
waits until every rank's part is there, writes the manifest (with the world size and the
ranks) and commits the directory with one rename. A checkpoint is therefore committed only
when every rank's part is written.

Mapping after a world-size change: new rank ``r`` restores the per-rank state of old rank
``r`` when ``r`` is below the old world size; a new rank beyond it keeps the per-rank state
it was registered with (fresh RNG streams, data position from the start of its loader),
and per-rank state of old ranks at or beyond the new world size is not restored. A
checkpoint written by a single process counts as rank 0's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import fmt
from .errors import CheckpointError, ConfigError
from .storage import TMP_TAG, write_durable


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the job (from ``RANK``/``WORLD_SIZE``, as torchrun and the agent set)."""

    rank: int = 0
    world: int = 1
    job: str = "job"
    round: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Ranks:
        env = os.environ if environ is None else environ
        try:
            rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
            round_ = int(env.get("LATTICE_ROUND") or env.get("TORCHELASTIC_RESTART_COUNT") or 0)
        except ValueError:
            raise ConfigError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} / "
                              f"LATTICE_ROUND={env.get('LATTICE_ROUND')!r} must be integers") from None
        if not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
        job = re.sub(r"[^A-Za-z0-9_.]", "_", env.get("LATTICE_JOB") or env.get("TORCHELASTIC_RUN_ID") or "job")
        return cls(rank, world, job, round_)


def rank_data(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def rank_tree(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def rank_part(rank: int) -> str:
    return f"rank-{rank:05d}.part.json"


def shared_tmp(root: Path, step: int, ranks: Ranks, seq: int) -> Path:
    """The temporary directory all ranks of this round write checkpoint ``step`` into.

    ``seq`` counts the checkpoints this process took in this round; every rank takes the
    same checkpoints (same policy, same code), so they agree on it, and a second checkpoint
    of the same step gets a directory of its own.
    """
    path = root / f"{fmt.step_dirname(step)}{TMP_TAG}job_{ranks.job}_r{ranks.round}_c{seq}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_part(tmp: Path, rank: int, files: dict[str, dict[str, int]]) -> None:
    """Declare this rank's files written (sizes and checksums), durably."""
    write_durable(tmp / rank_part(rank), json.dumps({"rank": rank, "files": files}).encode())


def wait_parts(tmp: Path, world: int, timeout: float) -> dict[str, dict[str, int]]:
    """Rank 0: wait until every rank declared its part; return all files. Backs off to 0.5 s."""
    deadline, delay = time.monotonic() + timeout, 0.005
    while True:
        missing = [r for r in range(world) if not (tmp / rank_part(r)).is_file()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise CheckpointError(f"{tmp.name}: rank(s) {missing[:8]} did not write their part within "
                                  f"{timeout:.0f}s; the checkpoint is not committed")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    files: dict[str, dict[str, int]] = {}
    for r in range(world):
        files.update(json.loads((tmp / rank_part(r)).read_bytes())["files"])
    return files


def cleanup_old_rounds(root: Path, ranks: Ranks) -> list[Path]:
    """Rank 0: delete this job's temporary checkpoint directories left by earlier rounds."""
    removed = []
    pattern = re.compile(rf"\.tmp-job_{re.escape(ranks.job)}_r(\d+)_c\d+$")
    for name in os.listdir(root) if root.is_dir() else []:
        m = pattern.search(name)
        if m and int(m.group(1)) < ranks.round:
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(root / name)
    return removed


@dataclasses.dataclass(frozen=True)
class Source:
    """One data file + tree file of a checkpoint, and the items to restore from it."""

    data: str
    tree: str
    items: tuple[str, ...]


def sources(manifest: dict[str, Any], names: list[str], per_rank: set[str], ranks: Ranks) -> tuple[list[Source], list[str]]:
    """Where each registered item comes from in this checkpoint, by the mapping rule above.

    Returns the sources to read and the per-rank files of other ranks (verified, not loaded).
    """
    world = int(manifest.get("world_size", 1))
    saved = manifest["items"]
    shared = tuple(n for n in names if n in saved and n not in per_rank)
    mine = tuple(n for n in names if n in saved and n in per_rank)
    if world == 1:
        return [Source(fmt.DATA, fmt.TREE, shared + (mine if ranks.rank == 0 else ()))], []
    out = [Source(fmt.DATA, fmt.TREE, shared)]
    if ranks.rank < world and mine:
        out.append(Source(rank_data(ranks.rank), rank_tree(ranks.rank), mine))
    others = [f for r in range(world) if r != ranks.rank or not mine for f in (rank_data(r), rank_tree(r))]
    return out, others
