"""A memory checkpoint the agent has uploaded (every file checked by the upload) is marked as
verified, and a restore from memory then skips the data checksum; anything else (not marked,
marked for another manifest of the same step, or a checkpoint in storage) is checked in full."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from memtier_support import cfg, commit, memory_root

import lattice
from lattice.core import fmt, restore
from lattice.core.stores import tiers
from lattice.runtime.agent.memtier import MemoryTier

KB = 256  # the array of each test checkpoint: 256 KiB


@pytest.fixture
def checksummed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes the restore code checksums (crc32c calls in lattice.core.restore), call by call."""
    seen: list[int] = []
    real = restore.crc32c.crc32c

    class Counting:
        @staticmethod
        def crc32c(data, value=0):  # type: ignore[no-untyped-def]
            seen.append(memoryview(data).nbytes)
            return real(data, value)

    monkeypatch.setattr(restore, "crc32c", Counting)
    return seen


def restore_from_memory(tmp: Path, memdir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, np.ndarray]:
    """A restarted worker's restore (``LATTICE_MEMORY_DIR`` set, as the agent does); (step, array)."""
    monkeypatch.setenv("LATTICE_MEMORY_DIR", str(memdir))
    w = np.zeros(KB * 256, dtype=np.float32)
    s = lattice.new_session(checkpoint_dir=str(tmp / "ckpt"), every_steps=None, capture_rng=False)
    try:
        s.register({"w": w})
        assert s.restored is not None and s.restored.path.parent == memdir
        return s.restored.step, w
    finally:
        s.close()


@contextlib.contextmanager
def tier_with_step_5(tmp: Path) -> Iterator[tuple[MemoryTier, Path]]:
    """An agent's memory tier driven by hand (``tick``) whose directory holds step 5, not uploaded."""
    with memory_root() as root:
        tier = MemoryTier(cfg(tmp, root))
        tier.start()
        tier._stop.set()
        tier._thread.join(5)  # type: ignore[union-attr]
        assert tier.dir is not None
        commit(tier.dir, 5, kb=KB)
        try:
            yield tier, tier.dir
        finally:
            tier.close(timeout=5)


@pytest.mark.timeout(60)
def test_an_uploaded_memory_checkpoint_restores_without_checksumming_its_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checksummed: list[int]) -> None:
    with tier_with_step_5(tmp_path) as (tier, memdir):
        checksummed.clear()
        step, w = restore_from_memory(tmp_path, memdir, monkeypatch)  # not uploaded yet: full check
        assert step == 5 and (w == 5).all() and sum(checksummed) > KB << 10
        tier.tick()  # upload (checks every file) -> marked
        assert tier.uploaded == 5 and (memdir / f"{tiers.VERIFIED}5").is_file()
        checksummed.clear()
        step, w = restore_from_memory(tmp_path, memdir, monkeypatch)
        assert step == 5 and (w == 5).all()
        assert sum(checksummed) < 16 << 10  # the small tree file only, none of the 256 KiB of data
        commit(memdir, 10, kb=KB)
        tier.tick()
        assert not (memdir / f"{tiers.VERIFIED}5").exists()  # pruned with its checkpoint
        assert (memdir / f"{tiers.VERIFIED}10").is_file()


@pytest.mark.timeout(60)
def test_a_marker_of_another_checkpoint_of_the_same_step_does_not_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checksummed: list[int]) -> None:
    with tier_with_step_5(tmp_path) as (tier, memdir):
        tier.tick()
        assert (memdir / f"{tiers.VERIFIED}5").is_file()
        # step 5 committed again with other data (a restart from an older step got there again)
        ckpt = memdir / fmt.step_dirname(5)
        doc = fmt.parse_manifest((ckpt / fmt.MANIFEST).read_bytes())
        extra = {k: v for k, v in doc.items() if k not in ("format", "version", "step", "wall_time", "files",
                                                           "items", fmt.MANIFEST_CRC)}
        raw = fmt.manifest(5, time.time() + 1, doc["files"], doc["items"], extra)
        (ckpt / fmt.MANIFEST).write_bytes(raw)
        checksummed.clear()
        restore_from_memory(tmp_path, memdir, monkeypatch)
        assert sum(checksummed) > KB << 10  # checked in full


@pytest.mark.timeout(60)
def test_an_unmarked_corrupt_memory_checkpoint_is_still_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with memory_root() as root:
        memdir = root / "lattice-unit-x-n1"
        memdir.mkdir()
        commit(memdir, 5, kb=KB)
        commit(memdir, 10, kb=KB)
        data = memdir / fmt.step_dirname(10) / fmt.DATA
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0x01
        data.write_bytes(bytes(raw))
        step, w = restore_from_memory(tmp_path, memdir, monkeypatch)
        assert step == 5 and (w == 5).all()  # step 10 failed its checksum; fell back
