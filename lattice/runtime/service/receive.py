"""Receiving one uploaded file: the body streamed into a ``PartWriter`` block by block.

The event loop reads the socket; one writer thread per upload appends the blocks in order
(crc32c, then a copy into a page-aligned buffer written with ``O_DIRECT``) while the next ones
arrive, so the network and the disk overlap and at most ``DEPTH`` + 1 blocks of an upload are
in memory.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import mmap
import os
import threading
from pathlib import Path

import crc32c
from aiohttp import web

from lattice.core.persist import DirectWriter, Writeback, pwrite_all

BLOCK = 4 << 20  # bytes handed to the writer thread at a time
READ_SIZE = 1 << 20  # bytes per socket read while receiving a file
MAX_CHUNKS = 512  # per writev call (IOV_MAX is 1024 on Linux)
DEPTH = 2  # blocks of one upload queued for its writer thread while the next arrives
ALIGNED = 4 << 20  # bytes of the page-aligned buffer an upload's O_DIRECT writes go through


class PartWriter:
    """One file being received: appended block by block with a running crc32c, then fsynced.

    Where the filesystem takes ``O_DIRECT`` (a disk, not tmpfs), the bytes are copied into a
    page-aligned buffer and written from it straight to the disk, as Lattice's local persist
    writes: no dirty pages for the kernel to flush, and the service's page cache is left to
    the files it serves. Elsewhere they are written through the page cache, each block sent
    to the disk at once. A lock makes ``write``/``finish``/``abort`` safe to call from
    different threads in turn (an abort waits for a write in flight instead of racing it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0  # bytes received
        self.crc = 0
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._writeback = Writeback(self._fd)
        self._direct = DirectWriter(path)
        self._buf = mmap.mmap(-1, ALIGNED) if self._direct.fd is not None else None  # page-aligned
        self._held = 0  # bytes in the buffer, not yet on disk (less than one 4 KiB page between writes)

    def write(self, chunks: list[bytes]) -> None:
        """Append ``chunks`` to the file and to the checksum."""
        with self._lock:
            assert self._fd is not None, "write after finish/abort"
            for chunk in chunks:
                self.crc = crc32c.crc32c(chunk, self.crc)
            if self._buf is None:
                self._write_through(chunks)
                return
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = min(len(view), ALIGNED - self._held)
                    self._buf[self._held:self._held + n] = view[:n]
                    self._held, view = self._held + n, view[n:]
                    self.size += n
                    if self._held == ALIGNED:
                        self._flush()
            self._flush()

    def _write_through(self, chunks: list[bytes]) -> None:
        """Through the page cache (no ``O_DIRECT`` here): one ``pwritev``, no joining copy."""
        assert self._fd is not None
        want = sum(len(c) for c in chunks)
        done = os.pwritev(self._fd, chunks, self.size)
        if done < want:  # a short write (rare on files): write the rest plainly
            pwrite_all(self._fd, memoryview(b"".join(chunks))[done:], self.size + done)
        self._writeback.wrote(self.size, self.size + want)
        self.size += want

    def _flush(self, final: bool = False) -> None:
        """Write the buffer's aligned part with ``O_DIRECT`` and keep the rest (all of it if ``final``)."""
        assert self._fd is not None and self._buf is not None
        at = self.size - self._held  # file offset of the buffer's first byte: always aligned
        view = memoryview(self._buf)[:self._held]
        try:
            done = self._direct.write(view, at)
            if final or self._direct.fd is None:  # the tail, or everything once O_DIRECT gave up
                pwrite_all(self._fd, view[done:], at + done)
                done = self._held
        finally:
            view.release()
        if done < self._held:
            self._buf.move(0, done, self._held - done)
        self._held -= done
        if self._direct.fd is None:  # this filesystem refused O_DIRECT after all
            self._buf.close()
            self._buf = None

    def finish(self) -> None:
        """Write what is left, fsync the file and close it (the data is durable when this returns)."""
        with self._lock:
            if self._fd is not None:
                if self._buf is not None and self._held:
                    self._flush(final=True)
                os.fsync(self._fd)  # covers the O_DIRECT writes too: one inode
            self._close()

    def abort(self) -> None:
        """Close and delete the file (idempotent)."""
        with self._lock:
            self._close()
            self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        self._direct.close()
        if self._buf is not None:
            self._buf.close()
            self._buf = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


async def receive(request: web.Request, writer: PartWriter) -> None:
    """Copy the body into ``writer`` in blocks of about ``BLOCK`` bytes, written in order by one
    thread of this upload while the next blocks arrive; at most ``DEPTH`` + 1 blocks per upload
    are in memory."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    held = 0
    inflight: collections.deque[asyncio.Future[None]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lattice-upload") as thread:
        try:
            async for chunk in request.content.iter_any():
                chunks.append(chunk)
                held += len(chunk)
                if held >= BLOCK or len(chunks) >= MAX_CHUNKS:
                    if len(inflight) >= DEPTH:
                        await inflight.popleft()
                    inflight.append(loop.run_in_executor(thread, writer.write, chunks))
                    chunks, held = [], 0
            if chunks:
                inflight.append(loop.run_in_executor(thread, writer.write, chunks))
            while inflight:
                await inflight.popleft()
        except BaseException:  # let the queued writes end before the writer is aborted
            await asyncio.gather(*inflight, return_exceptions=True)
            raise


def widen_reads(transport: asyncio.BaseTransport | None) -> None:
    """Let the socket transport read up to ``READ_SIZE`` per call during a big upload.

    CPython's selector transport reads at most 256 KiB per ``recv`` (its ``max_size``); larger
    reads cut the per-chunk work of a multi-GiB body by about a quarter. Where the attribute
    does not exist (another event loop), nothing changes.
    """
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = max(transport.max_size, READ_SIZE)  # type: ignore[attr-defined]
