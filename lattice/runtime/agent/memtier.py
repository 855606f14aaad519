"""The agent's memory tier: workers checkpoint into shared memory, the agent persists in the background.

The agent makes one directory per job and agent under ``/dev/shm`` and gives it to its workers as
``LATTICE_MEMORY_DIR``. Workers commit their checkpoints there (the ordinary local format: it is
just a directory in memory) and upload nothing, so their blocking time is one memory copy and a
crashed worker's replacement restores from memory. The ``Replicator`` thread watches the directory,
uploads each newly committed checkpoint to the persistent storage with
``lattice.core.stores.transfer.upload`` (files first, manifest last; retention applied there), and
prunes the directory to its newest checkpoint. The directory outlives worker crashes; the agent
removes it when it exits, once its newest checkpoint is stored (``close`` waits, bounded), so a
planned stop loses nothing that was only in memory. A directory left by a dead agent of the same
job (its lock is free) is uploaded if it holds a checkpoint newer than storage, then removed.

Sizing: the newest checkpoint in storage (at start) and every newly committed one give the size S;
the tier needs room for ``SLOTS`` of them (the newest kept while the next is written). When
``/dev/shm`` (capped by ``--memory-limit``) is smaller, the agent logs how big it must be and how to
raise it, and falls back to the storage tier: it creates ``DISABLED`` in the directory, so workers
write straight to storage (a worker whose write there fails with ENOSPC creates it itself). Memory is reused, not pre-allocated: at most two checkpoints ever live
in the directory, and tmpfs hands the pages of a pruned one to the next.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ...core import fmt
from ...core.config import from_env
from ...core.errors import ConfigError
from ...core.storage import LocalDirectory, write_durable
from ...core.stores import tiers
from .memdir import (  # noqa: F401  (re-exported: cli.py and the tests use memtier.<name>)
    DISABLED,
    FULL,
    POLL,
    SLOTS,
    STAGE,
    _files,
    _lock,
    _owner,
    _read_disabled,
    add_flags,
    dir_size,
    human,
    options,
    parse_size,
    resolve_mode,
    too_small_message,
    usage,
)

log = logging.getLogger("lattice.agent")


class MemoryTier:
    """The memory dir of one agent and the thread that persists what its workers commit there."""

    def __init__(self, cfg: Any, metrics: Any = None):
        self.cfg, self.metrics = cfg, metrics
        self.mode = resolve_mode(cfg)
        self.root = Path(getattr(cfg, "memory_root", "/dev/shm"))
        self.limit: int | None = getattr(cfg, "memory_limit", None)
        self.dir: Path | None = None
        self.disabled: str | None = None  # why the tier fell back to storage
        self.uploaded = -1  # newest step this agent has stored
        self._store: Any = None
        self._keep = from_env().keep
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sized = -1  # newest step whose size was checked against the room
        self._deadline = float("inf")  # set by close(): until when the last upload may take
        self._retry_at, self._failures = 0.0, 0
        self._marker: bytes | None = None  # a DISABLED record not yet written (the memory was full)

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Rescue dead agents' dirs, check the room, create this agent's dir, start the replicator."""
        if self.mode == "off":
            self._gauge("memory_tier", 0)
            return
        for path in sorted(self.root.glob(f"{self._prefix()}-*")):
            self._rescue(path)
        size = self._stored_size()
        if size and SLOTS * size > self._room(0):
            self.mode = "off"
            self.disabled = too_small_message(self.root, size, self._room(0))
            log.error("%s (sized from the newest checkpoint in storage)", self.disabled)
            self._gauge("memory_tier", 0)
            return
        node = re.sub(r"[^A-Za-z0-9._-]", "_", self.cfg.node)
        self.dir = self.root / f"{self._prefix()}-{node}"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._lock_fd = _lock(self.dir, {"job": self.cfg.job, "node": self.cfg.node, "pid": os.getpid(),
                                         "host": socket.gethostname(), "storage": str(self.cfg.checkpoint_dir)})
        if self._lock_fd is None:
            raise ConfigError(f"memory dir {self.dir} is held by another live agent with node id {self.cfg.node!r}")
        log.info("memory tier on: workers checkpoint into %s (room %s), persisted to %s", self.dir,
                 human(self._room(0)), self.cfg.checkpoint_dir)
        self._gauge("memory_tier", 1)
        self._thread = threading.Thread(target=self._run, name="lattice-replicator", daemon=True)
        self._thread.start()

    def worker_env(self) -> dict[str, str]:
        """``LATTICE_MEMORY_DIR`` for the workers, while the tier is on or memory still holds unstored work."""
        if self.dir is None:
            return {}
        if self.disabled is not None and self._newest()[0] <= self.uploaded:
            return {}
        return {"LATTICE_MEMORY_DIR": str(self.dir)}

    def close(self, timeout: float | None = None) -> bool:
        """Store the newest checkpoint in memory (waiting at most ``timeout`` s), then remove the dir.

        Returns True if nothing committed stays only in memory. If the upload cannot finish in
        time the dir is kept (logged), so the next agent of the job on this node uploads it.
        """
        if self._thread is None:
            return True
        timeout = self.cfg.upload_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(timeout + 1.0)
        newest, _ = self._newest()
        if self._thread.is_alive() or newest > self.uploaded:
            log.error("memory tier: checkpoint step %d is not yet in storage after %.0fs; keeping it in %s "
                      "(the next agent of job %r on this node uploads it)", newest, timeout, self.dir, self.cfg.job)
            return False
        assert self.dir is not None and self._lock_fd is not None
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None
        return True

    # -- the replicator ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._guarded_tick()
            self._stop.wait(POLL)
        # stopping: store the newest checkpoint, retrying until the deadline
        while True:
            self._retry_at = 0.0
            self._guarded_tick()
            if self._newest()[0] <= self.uploaded or time.monotonic() >= self._deadline:
                return
            time.sleep(min(1.0, max(0.0, self._deadline - time.monotonic())))

    def _guarded_tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # the replicator must outlive any one bad moment
            log.exception("memory tier: replicator error: %s", exc)

    def tick(self) -> None:
        """One look at the memory dir: check the room, upload the newest new checkpoint, prune."""
        assert self.dir is not None
        step, path = self._newest()
        self._check_room(step, path)
        if path is not None and step > self.uploaded and time.monotonic() >= self._retry_at:
            self._upload(step, path)
        if step >= 0 and self.uploaded >= 0:
            self._prune(keep_newest=self.disabled is None)

    def _newest(self) -> tuple[int, Path | None]:
        if self.dir is None:
            return -1, None
        committed = LocalDirectory(self.dir).committed()
        return committed[0] if committed else (-1, None)

    def _upload(self, step: int, path: Path) -> None:
        store = self._open_store()
        stage = self._stage(step, path)
        if stage is None:
            return  # deleted (by the worker's retention) before we got to it: a newer one exists
        from ...core.stores import transfer

        size, t0 = dir_size(stage), time.monotonic()
        try:
            transfer.upload(stage, store, step, keep=self._keep)  # checks every file's size and crc32c
            with contextlib.suppress(OSError):  # no marker: a restore from memory checksums as usual
                tiers.mark_verified(self.dir, step, stage)
        except Exception as exc:
            self._failures += 1
            delay = min(30.0, 0.5 * 2 ** self._failures)
            self._retry_at = time.monotonic() + delay
            log.warning("memory tier: upload of step %d to %s failed (%s: %s); retrying in %.0fs", step,
                        store.url, type(exc).__name__, exc, delay)
            return
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        seconds = time.monotonic() - t0
        self._failures, self.uploaded = 0, step
        log.info("memory tier: step %d uploaded to %s: %s in %.2fs (%.0f MiB/s)", step, store.url, human(size),
                 seconds, size / (1 << 20) / max(seconds, 1e-6))
        for name, value in (("upload_seconds", seconds), ("upload_bytes", size), ("last_uploaded_step", step)):
            self._gauge(name, value)

    def _stage(self, step: int, path: Path) -> Path | None:
        """Hard-link the checkpoint's files into a private dir (no copy), so pruning cannot pull them away."""
        assert self.dir is not None
        stage = self.dir / f"{STAGE}{step}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            for entry in _files(path):
                os.link(entry.path, stage / entry.name)
        except FileNotFoundError:
            shutil.rmtree(stage, ignore_errors=True)
            return None
        if not (stage / fmt.MANIFEST).is_file():
            shutil.rmtree(stage, ignore_errors=True)
            return None
        return stage

    def _prune(self, keep_newest: bool) -> None:
        """Delete stored checkpoints from memory: all older than the newest stored (or, after a fall
        back to storage, the stored ones too); never one that is not yet stored."""
        assert self.dir is not None
        memory, pruned = LocalDirectory(self.dir), False
        for step, path in memory.committed():
            if step < self.uploaded or (step == self.uploaded and not keep_newest):
                with contextlib.suppress(OSError):  # the worker's own retention may have taken it
                    memory.delete(path)
                    pruned = True
        if pruned:  # their verified-markers go too; only here, not on every tick (a marker whose
            # checkpoint the worker's own retention removed waits for the next prune)
            tiers.drop_stale_marks(self.dir)

    # -- room ------------------------------------------------------------------------------------
    def _room(self, used: int) -> int:
        """What the tier may occupy in all: what it uses plus what the root has free, capped by the limit."""
        room = used + tiers.memory_room(self.root)
        return room if self.limit is None else min(room, self.limit)

    def _check_room(self, step: int, path: Path | None) -> None:
        """Size the tier from each new committed checkpoint, or notice one that filled the memory."""
        assert self.dir is not None
        if self.disabled is not None:
            self._write_marker()
            return
        used = usage(self.dir)
        room = self._room(used)
        by_worker = _read_disabled(self.dir)
        if by_worker is not None:  # a worker's write into memory failed (ENOSPC): it switched itself over
            size = int(by_worker.get("size") or 0)
            self._fall_back(too_small_message(self.root, size, room, at_least=not size), size, room, write=False)
            return
        if path is not None and step > self._sized:
            first, self._sized = self._sized < 0, step
            size = dir_size(path)
            if SLOTS * size > room:
                self._fall_back(too_small_message(self.root, size, room), size, room)
            elif first:
                log.info("memory tier: first checkpoint is %s; room for %d of them (%s)", human(size),
                         room // max(size, 1), human(room))
            return
        by_limit = self.limit is not None and room >= self.limit
        if used > 0 and (used > self.limit if by_limit else room - used < FULL):  # type: ignore[operator]
            # a checkpoint filled it before it could commit: it is at least as big as the whole room
            self._fall_back(too_small_message(self.root, max(used, room), room, at_least=True), max(used, room), room)

    def _fall_back(self, message: str, size: int, room: int, write: bool = True) -> None:
        """Switch the workers to the storage tier (the ``DISABLED`` file) and say why, once."""
        self.disabled = message
        log.error("%s", message)
        self._gauge("memory_tier", 0)
        if write:
            self._marker = json.dumps({"by": "agent", "size": size, "room": room, "message": message}).encode()
            self._write_marker()

    def _write_marker(self) -> None:
        """Write ``DISABLED`` (again on every tick while the memory is too full even for that)."""
        assert self.dir is not None
        if self._marker is None:
            return
        try:
            write_durable(self.dir / DISABLED, self._marker)
            self._marker = None
        except OSError as exc:
            log.warning("memory tier: cannot write %s yet (%s); retrying", self.dir / DISABLED, exc)

    # -- storage ---------------------------------------------------------------------------------
    def _open_store(self) -> Any:
        if self._store is None:
            from ...core.stores import open_store

            self._store = open_store(self.cfg.checkpoint_dir)
        return self._store

    def _stored_size(self) -> int:
        """Bytes of the newest checkpoint in storage (0 if none or unreadable)."""
        try:
            store = self._open_store()
            steps = store.list_committed()
            if not steps:
                return 0
            manifest = fmt.parse_manifest(store.read_manifest(steps[0]))
            return sum(int(f["size"]) for f in manifest["files"].values())
        except Exception as exc:  # storage may be down at start; the first checkpoint sizes the tier
            log.warning("memory tier: could not read the newest checkpoint's size from storage (%s)", exc)
            return 0

    def _prefix(self) -> str:
        """Memory dirs are per job *and* storage: two jobs of the same name (``lattice run`` calls
        every job "default") that checkpoint to different places never see each other's dirs."""
        where = hashlib.sha256(str(self.cfg.checkpoint_dir).encode()).hexdigest()[:12]
        return f"lattice-{self.cfg.job}-{where}"

    def _rescue(self, path: Path) -> None:
        """A memory dir of this job whose agent is gone: store its newest checkpoint if storage lacks it."""
        owner = _owner(path)
        if owner.get("job") != self.cfg.job or owner.get("storage") != str(self.cfg.checkpoint_dir) \
                or not path.is_dir():
            return
        fd = _lock(path, {})
        if fd is None:
            return  # its agent is alive
        try:
            committed = LocalDirectory(path).committed()
            if committed:
                step, ckpt = committed[0]
                store = self._open_store()
                stored = store.list_committed()
                if not stored or stored[0] < step:
                    from ...core.stores import transfer

                    transfer.upload(ckpt, store, step, keep=self._keep)
                    log.warning("memory tier: stored step %d left in memory by a dead agent (%s)", step, path)
            shutil.rmtree(path, ignore_errors=True)
            log.info("memory tier: removed %s, left by agent %s", path, owner.get("node"))
        except Exception as exc:
            log.error("memory tier: could not rescue %s (%s); left in place", path, exc)
        finally:
            os.close(fd)

    def _gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            with contextlib.suppress(KeyError):
                self.metrics.set(name, value)
