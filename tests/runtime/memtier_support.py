"""Tools for the memory-tier tests: a kernel-level read watch on a directory tree (inotify), a
private memory root under /dev/shm, and whether this machine lets a test mount its own tmpfs."""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

IN_ACCESS, IN_CLOSE_NOWRITE, IN_MOVED_TO, IN_CREATE = 0x1, 0x10, 0x80, 0x100
IN_ISDIR, IN_NONBLOCK, IN_CLOEXEC = 0x40000000, 0o4000, 0o2000000
_HEADER = 16  # struct inotify_event: int wd; uint32 mask, cookie, len; char name[len]


class ReadWatch:
    """Every read of a file (not a directory) anywhere under ``root``, by any process, seen by the kernel.

    inotify reports ``IN_ACCESS`` for each read and ``IN_CLOSE_NOWRITE`` when a file opened for
    reading is closed; writes, renames and listings do not count. Subdirectories made later are
    watched as they appear (a read in the instant between a directory's creation and its watch
    could be missed; the tests read much later than that).
    """

    def __init__(self, root: Path):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.reads: list[str] = []
        self._dirs: dict[int, str] = {}
        self._stop = threading.Event()
        self._add_tree(root)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _add_tree(self, top: Path) -> None:
        for d, _, _ in os.walk(top):
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(d),
                                              IN_ACCESS | IN_CLOSE_NOWRITE | IN_CREATE | IN_MOVED_TO)
            if wd >= 0:
                self._dirs[wd] = d

    def _run(self) -> None:
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if poll.poll(100):
                self._drain()

    def _drain(self) -> None:
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        i = 0
        while i + _HEADER <= len(buf):
            wd, mask, _, n = (int.from_bytes(buf[i + k:i + k + 4], "little") for k in (0, 4, 8, 12))
            name = buf[i + _HEADER:i + _HEADER + n].rstrip(b"\0").decode(errors="replace")
            i += _HEADER + n
            where = os.path.join(self._dirs.get(wd, "?"), name)
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                self._add_tree(Path(where))
            elif not mask & IN_ISDIR and mask & (IN_ACCESS | IN_CLOSE_NOWRITE):
                self.reads.append(where)

    def mark(self) -> int:
        """A position in ``reads``: ``since(mark)`` lists only later reads."""
        self._drain_now()
        return len(self.reads)

    def since(self, mark: int) -> list[str]:
        self._drain_now()
        return self.reads[mark:]

    def _drain_now(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._drain()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self.fd)


@contextmanager
def memory_root() -> Iterator[Path]:
    """A private directory on /dev/shm (a real tmpfs) for one test's memory tier; removed afterwards."""
    root = Path("/dev/shm") / f"lattice-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cfg(tmp: Path, root: Path, **kw: object) -> SimpleNamespace:
    base = dict(job="unit", node="n1", max_nodes=1, min_nodes=1, memory_tier="auto", memory_root=str(root),
                memory_limit=None, upload_timeout=10.0, checkpoint_dir=str(tmp / "ckpt"))
    return SimpleNamespace(**{**base, **kw})


def commit(memdir: Path, step: int, kb: int = 64) -> None:
    """A real checkpoint of ``step`` committed into ``memdir`` by a lattice session (as a worker would)."""
    import numpy as np

    import lattice

    s = lattice.new_session(checkpoint_dir=str(memdir), every_steps=None, keep=10, capture_rng=False)
    try:
        s.register({"w": np.full(kb * 256, step, dtype=np.float32)})
        s.step = step
        s.checkpoint()
        s.wait()
    finally:
        s.close()
