"""PartWriter: what the service writes to disk is exactly what arrived, whatever the chunking."""

from __future__ import annotations

import os
import random
from pathlib import Path

import crc32c
import pytest

from lattice.runtime.service.receive import PartWriter


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
def test_the_file_is_the_bytes_that_arrived(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    writer = write_all(tmp_path / "f", data, seed=size)
    assert (tmp_path / "f").read_bytes() == data
    assert (writer.size, writer.crc) == (size, crc32c.crc32c(data))


def test_abort_deletes_the_part_and_closes_everything(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path / "f")
    writer.write([os.urandom(10_000)])
    writer.abort()
    writer.abort()  # idempotent
    assert not (tmp_path / "f").exists()
    assert writer._fd is None
