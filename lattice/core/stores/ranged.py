"""Downloading one big file over several ranged reads at once.

One HTTP stream (the checkpoint service, an object store) is limited by one connection's
throughput and by the one thread that receives it; a restore after a node loss waits for it.
A file of ``RANGE_MIN`` bytes or more is therefore fetched as up to ``streams()`` byte ranges
in parallel, each written in place with ``pwrite``, and its crc32c is put together from the
ranges' crc32c values (``crc32c_combine``) so no byte is read twice.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import crc32c as _crc

from ..errors import ConfigError
from ..persist import pwrite_all
from ..restore import crc32c_combine

CHUNK = 8 << 20
RANGE_MIN = 64 << 20  # smaller files come in one stream
RANGE_SIZE = 32 << 20  # at least this many bytes per range


def streams() -> int:
    """Ranged reads per file at most: ``LATTICE_DOWNLOAD_STREAMS`` (default 4, 1 turns it off)."""
    text = os.environ.get("LATTICE_DOWNLOAD_STREAMS", "").strip()
    try:
        return max(1, int(text)) if text else 4
    except ValueError:
        raise ConfigError(f"LATTICE_DOWNLOAD_STREAMS={text!r}: expected a whole number >= 1") from None


def ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) of each range to fetch a file of ``size`` bytes in; one range if small."""
    k = min(streams(), size // RANGE_SIZE) if size >= RANGE_MIN else 1
    k = max(1, k)
    bounds = [size * i // k for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(k)]


def fetch_ranges(store: Any, step: int, name: str, dest: Path, parts: list[tuple[int, int]]) -> tuple[int, int]:
    """Fetch ``parts`` of a committed file in parallel into a new file ``dest`` (fsynced);
    returns (bytes, crc32c) of what arrived; a range that ended early makes the byte count
    short, which the caller's check against the manifest reports."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(parts), thread_name_prefix="lattice-fetch") as pool:
            got = list(pool.map(lambda p: _fetch_range(store, step, name, fd, *p), parts))
        os.fsync(fd)
    finally:
        os.close(fd)
    n, crc = got[0]
    for m, c in got[1:]:  # a short range leaves n below the file's size: the caller sees that
        crc, n = crc32c_combine(crc, c, m), n + m
    return n, crc


def _fetch_range(store: Any, step: int, name: str, fd: int, offset: int, length: int) -> tuple[int, int]:
    crc, got = 0, 0
    with store.open_range(step, name, offset, length) as src:
        while got < length and (data := src.read(min(CHUNK, length - got))):
            crc = _crc.crc32c(data, crc)
            pwrite_all(fd, memoryview(data), offset + got)
            got += len(data)
    return got, crc
