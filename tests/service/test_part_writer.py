"""PartWriter: what the service writes to disk is exactly what arrived, whatever the chunking,
through O_DIRECT on a disk, through the page cache on tmpfs, and when O_DIRECT gives up midway."""

from __future__ import annotations

import os
import random
from pathlib import Path

import crc32c
import pytest

from lattice.core import persist
from lattice.runtime.service import receive
from lattice.runtime.service.receive import PartWriter

SHM = Path("/dev/shm")


def chunked(data: bytes, rng: random.Random) -> list[list[bytes]]:
    """``data`` cut into calls of ragged chunks (1 byte to 1.5 MiB), as the event loop hands them over."""
    calls, at = [], 0
    while at < len(data):
        call = []
        for _ in range(rng.randint(1, 6)):
            n = rng.choice([1, 7, 4095, 4096, 4097, 65536, rng.randint(1, 3 << 19)])
            call.append(data[at:at + n])
            at += n
            if at >= len(data):
                break
        calls.append([c for c in call if c])
    return calls


def write_all(path: Path, data: bytes, seed: int) -> PartWriter:
    writer = PartWriter(path)
    for call in chunked(data, random.Random(seed)):
        writer.write(call)
    writer.finish()
    return writer


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, (4 << 20) - 1, 4 << 20, (9 << 20) + 12345])
def test_the_file_is_the_bytes_that_arrived_on_a_disk(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    probe = PartWriter(tmp_path / "probe")
    uses_direct = probe._buf is not None
    probe.abort()
    writer = write_all(tmp_path / "f", data, seed=size)
    assert (tmp_path / "f").read_bytes() == data
    assert (writer.size, writer.crc) == (size, crc32c.crc32c(data))
    if not uses_direct:
        pytest.skip("this filesystem refuses O_DIRECT: only the page-cache path ran")


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_tmpfs_refuses_o_direct_and_the_page_cache_path_writes_the_same(tmp_path: Path) -> None:
    d = Path(os.path.realpath(SHM)) / f"lattice-test-{os.getpid()}"
    d.mkdir()
    try:
        data = os.urandom((5 << 20) + 3)
        writer = write_all(d / "f", data, seed=1)
        assert writer._buf is None  # tmpfs: no O_DIRECT buffer was kept
        assert (d / "f").read_bytes() == data and writer.crc == crc32c.crc32c(data)
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_o_direct_giving_up_midway_loses_no_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that refuses O_DIRECT after some writes (EINVAL): the rest goes through the page cache."""
    real = persist.DirectWriter.write
    calls = {"n": 0}

    def flaky(self: persist.DirectWriter, chunk: memoryview, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 3 and self.fd is not None:
            self.close()  # what DirectWriter.write does on EINVAL
            return 0
        return real(self, chunk, offset)

    monkeypatch.setattr(receive.DirectWriter, "write", flaky)
    monkeypatch.setattr(receive, "ALIGNED", 1 << 20)
    data = os.urandom((6 << 20) + 999)
    writer = write_all(tmp_path / "f", data, seed=2)
    if calls["n"] < 3:
        pytest.skip("this filesystem refuses O_DIRECT: the midway fallback cannot be exercised")
    assert writer._buf is None
    assert (tmp_path / "f").read_bytes() == data and writer.crc == crc32c.crc32c(data)


def test_abort_deletes_the_part_and_closes_everything(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path / "f")
    writer.write([os.urandom(10_000)])
    writer.abort()
    writer.abort()  # idempotent
    assert not (tmp_path / "f").exists()
    assert writer._buf is None and writer._fd is None and writer._direct.fd is None
