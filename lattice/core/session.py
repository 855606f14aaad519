"""One process's checkpointing: registered items, the step counter, the policy, save and restore.

``lattice.register`` / ``step`` / ``checkpoint`` / ``wait`` are thin wrappers over the
process-wide default ``Session``; tests and advanced users can run their own.
"""

from __future__ import annotations

import concurrent.futures
import errno
import keyword
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .adapter import AdapterRegistry
from .arrays import CODECS, Codecs
from .config import Config
from .control import ControlFile
from .errors import CheckpointError, ConfigError, CorruptCheckpointError
from .persist import Persister
from .ranks import Ranks, cleanup_old_rounds
from .restore import Restored, read_manifest, restore_from
from .snapshot import Buffers, Item, fill, plan
from .state import State
from .storage import LocalDirectory
from .stores import tiers
from .stores.assemble import assemble
from .stores.uploader import Uploader

log = logging.getLogger("lattice")
RESERVED = {"step", "restored_from", "items"}


class Session:
    """Registered state plus the checkpoint machinery for one checkpoint directory."""

    def __init__(self, config: Config, adapters: AdapterRegistry, codecs: Codecs = CODECS,
                 internal: dict[str, Any] | None = None):
        self.config, self.adapters, self.codecs = config, adapters, codecs
        self.ranks = Ranks.from_env()
        self.config = config = self._fit_policy(config)
        # a URL commits into a local staging (or the agent's memory) directory; see stores/tiers.py
        self.location = tiers.resolve(str(config.checkpoint_dir), self.ranks)
        self.storage = LocalDirectory(self.location.local)
        self.storage.prepare()
        self._uploader = (Uploader(self.location.store, lambda: self.config.keep)
                          if self.location.upload and self.location.store is not None else None)
        if self.ranks.rank == 0:
            for path in self.storage.cleanup_leftovers() + cleanup_old_rounds(self.storage.root, self.ranks):
                log.info("removed leftover %s from an interrupted checkpoint", path)
            if self._uploader is not None or self.location.assemble:
                self._cleanup_store()
        self.items: dict[str, Item] = {}
        self.step = 0
        self.restored: Restored | None = None
        self._restore_path: Path | None = None
        self._restore_checked = False
        self.restored_world: int | None = None  # world size of the restored checkpoint
        self._resize_hooks: list[Any] = []
        self._buffers = Buffers()
        # the agent owns retention in its memory directory (it may still be uploading older ones)
        self._persister = Persister(self.storage, 1 << 30 if self.location.kind == "memory" else config.keep)
        self._persister.part_timeout = config.part_timeout
        if self.location.assemble and self.location.store is not None:  # ranks on several hosts, a URL
            store = self.location.store
            self._persister.assemble = lambda tmp, snap, files, manifest_for: assemble(
                store, tmp, snap, files, manifest_for, self.config.keep, self.config.part_timeout)
        self._inflight: concurrent.futures.Future[Path] | None = None
        self._inflight_step = -1
        self._seq = 0
        self._last_time = time.monotonic()
        self.skipped = 0
        self.state = State(self)
        self._internal = dict(internal or {})
        control = os.environ.get("LATTICE_CONTROL")
        self._control = ControlFile.open(control) if control else None
        if self._control is not None:
            self._persister.on_commit = self._control.report_checkpoint

    def _cleanup_store(self) -> None:
        """Remove abandoned uploads from the store (only ones old enough to be safe; see Store.cleanup)."""
        try:
            self.location.store.cleanup()  # type: ignore[union-attr]
        except Exception as exc:  # leftovers only waste space
            log.warning("could not clean up abandoned uploads in %s: %s", self.location.url, exc)

    # -- registration and restore -------------------------------------------------
    def register(self, objects: dict[str, Any]) -> State:
        new: dict[str, Item] = {}
        for name, obj in objects.items():
            self._check_name(name, obj)
            adapter = self.adapters.resolve(obj, name)
            new[name] = Item(adapter, adapter.attach(obj))
            for suffix, part in getattr(adapter, "companions", lambda o: {})(obj).items():
                if f"{name}_{suffix}" not in self.items:  # e.g. a loader's elastic sampler (shared)
                    comp = self.adapters.resolve(part, f"{name}_{suffix}")
                    new[f"{name}_{suffix}"] = Item(comp, comp.attach(part))
        if not self.items and self.config.capture_rng:
            for name, obj in self._internal.items():
                adapter = self.adapters.resolve(obj, name)
                new[name] = Item(adapter, adapter.attach(obj))
        self.items.update(new)
        if self.config.restore:
            self._restore(new)
        return self.state

    def restore_now(self, names: list[str] | None = None) -> Restored | None:
        """Restore registered items (all by default) now, for items registered with ``restore=False``.

        The first call picks the newest good checkpoint (and sets ``step``); later calls read
        the same one, so items can be restored at different moments (transparent mode).
        """
        self._restore({n: self.items[n] for n in (self.items if names is None else names)})
        return self.restored

    def on_resize(self, fn: Any) -> Any:
        """Call ``fn(old_world, new_world)`` once if the restored checkpoint's world size differs.

        Registered before the restore: called at restore time; after it: called now.
        """
        self._resize_hooks.append(fn)
        if self.restored_world is not None:
            self._call_resize(fn)
        return fn

    def _call_resize(self, fn: Any) -> None:
        if self.restored_world is not None and self.restored_world != self.ranks.world:
            log.info("world size changed from %d to %d since the checkpoint", self.restored_world, self.ranks.world)
            fn(self.restored_world, self.ranks.world)

    def _fit_policy(self, config: Config) -> Config:
        """With several ranks every rank must checkpoint the same steps: no time-based or skipped ones."""
        if self.ranks.world == 1:
            return config
        changes: dict[str, Any] = {}
        if config.every_seconds is not None:
            log.warning("every_seconds is ignored with %d ranks (ranks would pick different steps); "
                        "use every_steps", self.ranks.world)
            changes["every_seconds"] = None
        if config.on_busy != "wait":
            changes["on_busy"] = "wait"  # a skipped step on one rank would leave rank 0 waiting for its part
        return config.replace(**changes) if changes else config

    def _check_name(self, name: str, obj: Any) -> None:
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_") or name in RESERVED:
            raise ConfigError(f"cannot register {name!r}: names must be identifiers, not start with '_', "
                              f"and not be one of {sorted(RESERVED)}")
        if name in self.items and self.items[name].obj is not obj:
            raise ConfigError(f"{name!r} is already registered with another object")

    def _restore(self, new: dict[str, Item]) -> None:
        if not self._restore_checked:
            self._restore_checked = True
            self.restored = self._restore_newest(new)
            if self.restored:
                self._restore_path = self.restored.path
                self.step = self.restored.step
                self.restored_world = int(read_manifest(self.restored.path).get("world_size", 1))
                for fn in self._resize_hooks:
                    self._call_resize(fn)
        elif self._restore_path is not None:
            late = restore_from(self._restore_path, new, self.codecs, self.ranks)
            self._apply(late, new)

    def _restore_newest(self, items: dict[str, Item]) -> Restored | None:
        damaged: list[tuple[Path | None, CorruptCheckpointError]] = []
        loc = self.location
        for cand in tiers.candidates(loc, tolerate_store_errors=loc.kind == "memory"):
            step, path = cand.step, cand.path
            try:
                path = tiers.fetch(loc, cand)
                restored = restore_from(path, items, self.codecs, self.ranks, verified=tiers.verified(cand))
            except FileNotFoundError:
                log.info("checkpoint step %d left %s while restoring; trying an older one", step, loc.url)
                continue
            except CorruptCheckpointError as exc:
                log.warning("checkpoint step %d is unusable, falling back to an older one: %s", step, exc)
                damaged.append((path, exc))
                continue
            self._apply(restored, items)
            self._set_aside(damaged)
            self._trim(restored.step)
            if self._uploader is not None and cand.tier == "staging" and self.ranks.rank == 0:
                self._inflight = self._uploader.resume(path, step)
            log.info("restored step %d from %s%s", restored.step, path,
                     f" (not in checkpoint, kept as given: {restored.missing})" if restored.missing else "")
            return restored
        if damaged:
            reasons = "; ".join(str(exc) for _, exc in damaged)
            raise CheckpointError(f"no usable checkpoint in {loc.url}: {reasons}. Nothing was "
                                  "deleted; move the damaged checkpoints away to start from scratch")
        return None

    def _trim(self, restored_step: int) -> None:
        """Apply retention up to the restored step: a crash between a commit and its retention
        (possibly twice in a row) can leave more than ``keep`` behind. Only rank 0 deletes; with
        ranks on several hosts, where the staging directory holds only downloads, the first rank
        of each host prunes its host's (else every restart would leave one more download)."""
        first_here = self.location.assemble and os.environ.get("LOCAL_RANK", "0") == "0"
        if not (self.ranks.rank == 0 or first_here) or self.location.kind == "memory":
            return
        retired = self.storage.retire_old(self.config.keep, newest=restored_step)
        if retired:
            log.info("deleted old checkpoint step(s) %s left by an interrupted retention", [s for s, _ in retired])
            threading.Thread(target=lambda: [shutil.rmtree(t, ignore_errors=True) for _, t in retired],
                             name="lattice-trim", daemon=True).start()

    def _set_aside(self, damaged: list[tuple[Path, CorruptCheckpointError]]) -> None:
        if self.ranks.rank != 0:
            return  # every rank skips the damaged ones; only rank 0 moves them
        for path, _ in damaged:
            if path is None:  # damaged in the store: left there (a new commit of its step replaces it)
                continue
            try:
                log.warning("moved damaged checkpoint %s to %s", path, self.storage.quarantine(path))
            except OSError as exc:
                log.warning("could not move damaged checkpoint %s aside: %s", path, exc)

    def _apply(self, restored: Restored, items: dict[str, Item]) -> None:
        for name, obj in restored.objects.items():
            items[name].obj = obj

    # -- steps and checkpoints ----------------------------------------------------
    def step_done(self) -> None:
        """Count one training step and checkpoint if the policy says so (or the agent asks)."""
        self.step += 1
        if self._control is not None:
            self._control.report(self.step)
            if self._control.stop_requested(self.step):
                self._planned_stop()
        cfg = self.config
        due = bool(cfg.every_steps) and self.step % cfg.every_steps == 0
        if not due and cfg.every_seconds is not None:
            due = time.monotonic() - self._last_time >= cfg.every_seconds
        if due:
            self.checkpoint(policy=True)

    def _planned_stop(self) -> None:
        """The agent asked for a stop: checkpoint this completed step, wait for the commit, exit 0."""
        log.info("stop requested by the agent: checkpointing step %d before exiting", self.step)
        self.checkpoint()
        self.wait()
        raise SystemExit(0)

    def _leave_memory_tier(self) -> None:
        """The agent turned the memory tier off (contract B): from now on checkpoint to storage directly."""
        loc = tiers.resolve(str(self.config.checkpoint_dir), self.ranks)
        log.warning("memory tier off: checkpoints from step %d go to %s", self.step, loc.url)
        self.location = loc
        self.storage = self._persister.storage = LocalDirectory(loc.local)
        self.storage.prepare()
        self._persister.keep = self.config.keep
        if loc.upload and loc.store is not None:
            self._uploader = Uploader(loc.store, lambda: self.config.keep)

    def _check_memory_room(self, size: int) -> None:
        """Before writing into the agent's memory: no room for this checkpoint -> storage, now."""
        room = tiers.memory_room(self.location.local)
        if size + (1 << 20) > room:
            why = (f"a checkpoint of {size / 2**20:.1f} MiB does not fit in {self.location.local} "
                   f"({room / 2**20:.1f} MiB free): writing to the storage tier instead; make /dev/shm bigger "
                   "(docker --shm-size, or an emptyDir with medium: Memory in Kubernetes)")
            log.error("%s", why)
            tiers.disable_memory(self.location.local, size, room, why)
            self._leave_memory_tier()

    def _memory_write_failed(self, future: concurrent.futures.Future[Path]) -> None:
        """A write into the memory dir ran out of room (other ranks filled it): later ones go to storage."""
        exc = future.exception()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not tiers.memory_disabled(self.location.local):
            tiers.disable_memory(self.location.local, 0, 0, f"a checkpoint into the memory tier failed: {exc}")

    def busy(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def checkpoint(self, *, policy: bool = False) -> concurrent.futures.Future[Path] | None:
        """Snapshot now and persist in the background; returns the persist future (None if skipped)."""
        if not self.items:
            raise CheckpointError("nothing is registered: call lattice.register(...) before checkpointing")
        if self.busy():
            if policy and self.config.on_busy == "skip":
                self.skipped += 1
                log.info("checkpoint at step %d skipped: step %s is still persisting (on_busy='skip')",
                         self.step, self._inflight_step)
                return None
            log.info("checkpoint at step %d waits for the previous one to finish persisting", self.step)
            concurrent.futures.wait([self._inflight])
        if self.location.kind == "memory" and tiers.memory_disabled(self.location.local):
            self._leave_memory_tier()
        # the persist starts before the copy and writes each region once the copy has passed it
        snap = plan(self.items, self.step, self._buffers, self.codecs, self.ranks)
        snap.seq = self._seq
        if self.location.kind == "memory":
            self._check_memory_room(snap.nbytes)
        future = self._persister.submit(snap)
        if self.location.kind == "memory":
            future.add_done_callback(self._memory_write_failed)
        try:
            fill(snap)
        except BaseException:
            concurrent.futures.wait([future])  # it aborts at once: nothing is committed
            raise
        if self._uploader is not None:  # the checkpoint is done once it is in the store
            future = self._uploader.chain(future, snap.step, snap)
        self._seq += 1
        self._last_time = time.monotonic()
        self._inflight, self._inflight_step = future, snap.step
        return future

    def wait(self, timeout: float | None = None) -> Path | None:
        """Block until the in-flight checkpoint is committed and older ones retired; raise if it failed.

        With a URL as checkpoint_dir this includes the upload to the store (and its retention).
        """
        if self._inflight is None:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            path = self._inflight.result(timeout)
        except concurrent.futures.TimeoutError:
            raise CheckpointError(f"checkpoint not committed within {timeout}s") from None
        except Exception as exc:
            raise CheckpointError(f"checkpoint failed: {type(exc).__name__}: {exc}") from exc
        self._persister.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._uploader is not None:
            self._uploader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return path

    @property
    def last_committed(self) -> int | None:
        return self._persister.last_committed

    def close(self) -> None:
        """Wait for the in-flight checkpoint (logging a failure) and free the host buffer."""
        if self._inflight is not None:
            try:
                self._inflight.result()
            except Exception:  # already logged by the persist thread
                pass
            self._persister.join()
            if self._uploader is not None:
                self._uploader.join()
        self._buffers.release()
