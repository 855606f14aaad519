"""Ranged downloads: the crc32c arithmetic, how a file is cut into ranges, ``open_range`` on
every backend, and a download in ranges that still catches a damaged or truncated file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import crc32c
import pytest
from storage_support import Backend, make_checkpoint

from lattice.core import fmt
from lattice.core.errors import ConfigError, CorruptCheckpointError
from lattice.core.restore import crc32c_combine
from lattice.core.stores import ranged, transfer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("seed", range(20))
def test_combined_crc32c_is_the_crc32c_of_the_whole(seed: int) -> None:
    rng = random.Random(seed)
    data = os.urandom(rng.choice([0, 1, 5, 4096, 100_003]))
    cut = rng.randint(0, len(data))
    a, b = data[:cut], data[cut:]
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(data)


def test_combining_many_pieces_in_order() -> None:
    data = os.urandom(3 << 20)
    bounds = [0, 1, 4095, 1 << 20, (1 << 20) + 7, 3 << 20]
    crc, n = crc32c.crc32c(data[:bounds[1]]), bounds[1]
    for lo, hi in zip(bounds[1:], bounds[2:], strict=False):
        crc, n = crc32c_combine(crc, crc32c.crc32c(data[lo:hi]), hi - lo), hi
    assert (n, crc) == (len(data), crc32c.crc32c(data))


def test_files_are_cut_into_ranges_only_when_big(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LATTICE_DOWNLOAD_STREAMS", raising=False)
    assert ranged.ranges(10 << 20) == [(0, 10 << 20)]
    assert len(ranged.ranges(64 << 20)) == 2
    parts = ranged.ranges((1 << 30) + 3)
    assert len(parts) == 4 and parts[0][0] == 0 and sum(n for _, n in parts) == (1 << 30) + 3
    assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:], strict=False))
    monkeypatch.setenv("LATTICE_DOWNLOAD_STREAMS", "1")
    assert ranged.ranges(1 << 30) == [(0, 1 << 30)]
    monkeypatch.setenv("LATTICE_DOWNLOAD_STREAMS", "many")
    with pytest.raises(ConfigError, match="LATTICE_DOWNLOAD_STREAMS='many'"):
        ranged.ranges(1 << 30)


def test_open_range_reads_exactly_the_range_on_every_backend(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "src", 5)
    transfer.upload(local, backend.store, 5)
    data = (local / fmt.DATA).read_bytes()

    def read(offset: int, length: int) -> bytes:
        with backend.store.open_range(5, fmt.DATA, offset, length) as f:
            out = b""
            while chunk := f.read(7000):
                out += chunk
            return out

    assert read(0, 10) == data[:10]
    assert read(1000, 30_000) == data[1000:31_000]
    assert read(len(data) - 5, 100) == data[-5:]  # shorter at the end of the file
    assert read(len(data) + 10, 100) == b""  # wholly past the end
    with pytest.raises(FileNotFoundError):
        backend.store.open_range(6, fmt.DATA, 0, 10)


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut even the helper's 64 KiB file into four ranges."""
    monkeypatch.setattr(ranged, "RANGE_MIN", 1)
    monkeypatch.setattr(ranged, "RANGE_SIZE", 1)
    monkeypatch.setenv("LATTICE_DOWNLOAD_STREAMS", "4")


@pytest.mark.usefixtures("small_ranges")
def test_a_download_in_ranges_is_identical(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "src", 7)
    transfer.upload(local, backend.store, 7)
    got = transfer.download(backend.store, 7, tmp_path / "dst")
    for name in (fmt.DATA, fmt.TREE, fmt.MANIFEST):
        assert (got / name).read_bytes() == (local / name).read_bytes()


@pytest.mark.usefixtures("small_ranges")
def test_a_download_in_ranges_catches_a_flipped_bit_and_a_truncated_file(backend: Backend, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path / "src", 8, payload=bytes(range(256)) * 256)
    transfer.upload(local, backend.store, 8)
    damaged = bytearray((local / fmt.DATA).read_bytes())
    damaged[len(damaged) * 3 // 4] ^= 0x01  # in the last range
    backend.overwrite(8, fmt.DATA, bytes(damaged))
    with pytest.raises(CorruptCheckpointError, match="crc32c mismatch"):
        transfer.download(backend.store, 8, tmp_path / "dst")
    backend.overwrite(8, fmt.DATA, bytes(damaged[:len(damaged) // 3]))  # the last ranges are past the end
    with pytest.raises(CorruptCheckpointError, match="bytes, manifest says"):
        transfer.download(backend.store, 8, tmp_path / "dst2")
    assert not (tmp_path / "dst" / fmt.step_dirname(8)).exists()
    assert not (tmp_path / "dst2" / fmt.step_dirname(8)).exists()
