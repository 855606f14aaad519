"""Receiving one uploaded file: the body streamed into a ``PartWriter`` block by block.

The event loop reads the socket; one writer thread per upload appends the blocks in order
(crc32c, ``writev``, early writeback) while the next ones arrive, so the network and the disk
overlap and at most ``DEPTH`` + 1 blocks of an upload are in memory.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures

from aiohttp import web

from .layout import PartWriter

BLOCK = 4 << 20  # bytes handed to the writer thread at a time
READ_SIZE = 1 << 20  # bytes per socket read while receiving a file
MAX_CHUNKS = 512  # per writev call (IOV_MAX is 1024 on Linux)
DEPTH = 2  # blocks of one upload queued for its writer thread while the next arrives


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
