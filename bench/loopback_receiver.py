#!/usr/bin/env python
"""The loopback ceiling of ``bench/service.py``: a lean durable receiver, not a service.

    python bench/loopback_receiver.py FILE      (prints its port, then serves until killed)

Per connection: a 32-byte header with the size in ASCII, then that many bytes. They are
received straight into a ring of ``DEPTH`` page-aligned ``BLOCK``-byte buffers while writer
threads write the filled ones to ``FILE`` with ``O_DIRECT`` (no copy into the page cache, the
way Lattice's own local persist writes), then fsync, delete, answer ``ok``. No HTTP, no
checksum, no staging. Its sizes are the best of those tried on a 2-vCPU VM (1-8 MiB blocks,
2-16 buffers): roughly what a durable service there could approach at best.
"""

from __future__ import annotations

import mmap
import os
import socket
import sys
from concurrent.futures import Future, ThreadPoolExecutor

BLOCK = 2 << 20
DEPTH = 8  # buffers: one being received into, the others being written
ALIGN = 4096


def receive(conn: socket.socket, path: str, pool: ThreadPoolExecutor) -> None:
    size = int(conn.recv(32, socket.MSG_WAITALL).decode().strip())
    bufs = [mmap.mmap(-1, BLOCK) for _ in range(DEPTH)]  # anonymous mmaps are page-aligned
    writing: list[Future[None] | None] = [None] * DEPTH
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        direct = os.open(path, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
    except OSError:  # a filesystem without O_DIRECT: through the page cache then
        direct = os.dup(fd)
    got = i = 0
    try:
        while got < size:
            view, n = memoryview(bufs[i]), 0
            while n < BLOCK and got + n < size:
                k = conn.recv_into(view[n:], min(BLOCK, size - got) - n)
                if not k:
                    raise ConnectionError("the sender went away")
                n += k
            writing[i] = pool.submit(write, direct, fd, view, n - n % ALIGN, n, got)
            got, i = got + n, (i + 1) % DEPTH
            if writing[i] is not None:
                writing[i].result()  # the next buffer is written: receive into it
        for pending in writing:
            if pending is not None:
                pending.result()
        os.fsync(fd)
        if os.fstat(fd).st_size != size:
            raise OSError(f"wrote {os.fstat(fd).st_size} of {size} bytes")
    finally:
        os.close(direct)
        os.close(fd)
    conn.sendall(b"ok")
    os.unlink(path)  # after the answer: the Lattice contenders' deletions are not timed either


def write(direct: int, fd: int, view: memoryview, aligned: int, n: int, offset: int) -> None:
    if aligned:
        write_all(direct, view[:aligned], offset)
    if n > aligned:  # the unaligned tail of the last block
        write_all(fd, view[aligned:n], offset + aligned)


def write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def main() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(listener.getsockname()[1], flush=True)
    with ThreadPoolExecutor(DEPTH - 1) as pool:
        while True:
            conn, _ = listener.accept()
            with conn:
                receive(conn, sys.argv[1], pool)


if __name__ == "__main__":
    main()
