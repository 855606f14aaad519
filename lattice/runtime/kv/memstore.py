"""The embedded server's state: Consul-style KV entries, sessions and indexes.

This is the data model behind :mod:`lattice.runtime.kv.server`, kept free of
HTTP so its rules are easy to read and test. It follows Consul's semantics:

* one global raft-like index, bumped once per effective write (a transaction's
  writes share one index); writing identical content does not bump it;
* per key ``CreateIndex``/``ModifyIndex``/``LockIndex``/``Session``;
* tombstones, so a prefix's index rises when a key under it is deleted and
  blocked readers wake up (old tombstones are folded into a floor index, which
  may cause spurious wake-ups but never missed ones);
* sessions with a TTL, ``release``/``delete`` behaviour and a lock delay; a
  background reaper invalidates a session ``ttl_multiplier`` x TTL after its
  last renewal (Consul uses 2x).

All state sits behind one :class:`threading.Condition`; every write notifies
it, which is how blocking queries and the reaper wake up.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from lattice.runtime.kv.memsessions import SessionRec


class OpError(Exception):
    """One operation failed (a transaction turns these into its ``Errors``)."""


class InvalidSession(OpError):
    """An operation named a session that does not exist."""


@dataclass(frozen=True)
class Entry:
    """One KV entry, immutable so snapshots for rollback are cheap dict copies."""

    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None


class Batch:
    """Writes made under the store lock at one shared index.

    Obtained from :meth:`MemStore.batch`; raising inside the ``with`` block
    rolls every write back.
    """

    def __init__(self, store: MemStore) -> None:
        self._s = store
        self.index = store.raft_index + 1
        self.dirty = False

    def _touch(self) -> int:
        self.dirty = True
        self._s.kv_index = self.index
        return self.index

    def get(self, key: str) -> Entry | None:
        return self._s.kv.get(key)

    def tree(self, prefix: str) -> list[Entry]:
        return [self._s.kv[k] for k in sorted(self._s.kv) if k.startswith(prefix)]

    def set(self, key: str, value: bytes, flags: int = 0) -> Entry:
        """Write unconditionally, keeping any lock holder."""
        old = self._s.kv.get(key)
        if old is None:
            idx = self._touch()
            new = Entry(key, value, flags, idx, idx)
            self._s.tombstones.pop(key, None)
        elif old.value == value and old.flags == flags:
            return old
        else:
            new = replace(old, value=value, flags=flags, modify_index=self._touch())
        self._s.kv[key] = new
        return new

    def cas(self, key: str, value: bytes, flags: int, index: int) -> Entry:
        """Write only if the key's ModifyIndex is ``index`` (0: must not exist)."""
        self.check_index(key, index, allow_absent=index == 0)
        return self.set(key, value, flags)

    def check_index(self, key: str, index: int, *, allow_absent: bool = False) -> Entry | None:
        entry = self._s.kv.get(key)
        if entry is None:
            if allow_absent:
                return None
            raise OpError(f'key "{key}" doesn\'t exist')
        if entry.modify_index != index:
            raise OpError(
                f'failed index check for key "{key}", current modify index '
                f"{entry.modify_index} != {index}"
            )
        return entry

    def check_not_exists(self, key: str) -> None:
        if key in self._s.kv:
            raise OpError(f'key "{key}" exists')

    def check_session(self, key: str, session: str) -> Entry:
        entry = self._s.kv.get(key)
        if entry is None:
            raise OpError(f'key "{key}" doesn\'t exist')
        if entry.session != session:
            raise OpError(
                f'failed session check for key "{key}", current session '
                f'"{entry.session or ""}" != "{session}"'
            )
        return entry

    def lock(self, key: str, value: bytes, flags: int, session: str) -> Entry:
        """Acquire ``key`` for ``session`` (Consul's ``?acquire``)."""
        if session not in self._s.sessions:
            raise InvalidSession(f'invalid session "{session}"')
        if self._s.lock_delays.get(key, 0.0) > self._s.clock():
            raise OpError(f'failed to lock key "{key}", lock delay is active')
        old = self._s.kv.get(key)
        if old is not None and old.session not in (None, session):
            raise OpError(f'failed to lock key "{key}", lock is already held')
        if old is not None and old.session == session:
            return self.set(key, value, flags)
        self._s.tombstones.pop(key, None)
        idx = self._touch()
        create = old.create_index if old else idx
        locks = (old.lock_index if old else 0) + 1
        new = Entry(key, value, flags, create, idx, locks, session)
        self._s.kv[key] = new
        return new

    def unlock(self, key: str, value: bytes, flags: int, session: str) -> Entry:
        """Release ``key`` held by ``session`` (Consul's ``?release``)."""
        old = self._s.kv.get(key)
        if old is None or old.session != session:
            raise OpError(f'failed to unlock key "{key}", lock not held by session "{session}"')
        new = replace(old, value=value, flags=flags, session=None, modify_index=self._touch())
        self._s.kv[key] = new
        return new

    def delete(self, key: str) -> None:
        if self._s.kv.pop(key, None) is not None:
            self._s.tombstones[key] = self._touch()

    def delete_tree(self, prefix: str) -> None:
        for key in [k for k in self._s.kv if k.startswith(prefix)]:
            self.delete(key)

    def delete_cas(self, key: str, index: int) -> None:
        """Delete if ModifyIndex is ``index``; an absent key counts as success."""
        if key in self._s.kv:
            self.check_index(key, index)
            self.delete(key)


class MemStore:
    """Thread-safe in-memory KV store with sessions, as Consul models them.

    Args:
        min_session_ttl: shortest session TTL accepted, seconds (Consul: 10).
        ttl_multiplier: a session lapses this many TTLs after its last renewal.
        max_tombstones: tombstones kept before folding the oldest into a floor.
        clock: monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        *,
        min_session_ttl: float = 10.0,
        ttl_multiplier: float = 2.0,
        max_tombstones: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cond = threading.Condition()
        self.clock = clock
        self.min_session_ttl = min_session_ttl
        self.ttl_multiplier = ttl_multiplier
        self.max_tombstones = max_tombstones
        self.kv: dict[str, Entry] = {}
        self.tombstones: dict[str, int] = {}
        self.tombstone_floor = 0
        self.lock_delays: dict[str, float] = {}
        self.sessions: dict[str, SessionRec] = {}
        self.raft_index = 0
        self.kv_index = 0
        self.session_index = 0
        self.closed = False
        self._reaper: threading.Thread | None = None

    # ------------------------------------------------------------------ writes
    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """Hold the lock and yield a :class:`Batch`; commit on exit, roll back on error."""
        with self.cond:
            saved = (dict(self.kv), dict(self.tombstones), self.kv_index, dict(self.lock_delays))
            b = Batch(self)
            try:
                yield b
            except BaseException:
                self.kv, self.tombstones, self.kv_index, self.lock_delays = saved
                raise
            if b.dirty:
                self.raft_index = b.index
                self._fold_tombstones()
                self.cond.notify_all()

    def _fold_tombstones(self) -> None:
        excess = len(self.tombstones) - self.max_tombstones
        if excess <= 0:
            return
        oldest = sorted(self.tombstones.items(), key=lambda kv: kv[1])[:excess]
        for key, idx in oldest:
            del self.tombstones[key]
            self.tombstone_floor = max(self.tombstone_floor, idx)

    # ------------------------------------------------------------------- reads
    def prefix_index(self, prefix: str) -> int:
        """Consul's index for a recursive read of ``prefix`` (call with the lock held)."""
        if not prefix:
            return max(1, self.kv_index)
        idx = max((e.modify_index for k, e in self.kv.items() if k.startswith(prefix)), default=0)
        tomb = max((i for k, i in self.tombstones.items() if k.startswith(prefix)), default=0)
        idx = max(idx, tomb, self.tombstone_floor if idx or tomb else 0)
        return max(1, idx or self.kv_index)

    def key_index(self, key: str) -> int:
        """Consul's index for a single-key read (call with the lock held)."""
        entry = self.kv.get(key)
        return entry.modify_index if entry else max(1, self.kv_index)

    def block(self, index_fn: Callable[[], int], index: int, timeout: float) -> int:
        """Wait until ``index_fn() > index`` or ``timeout`` passes; return ``index_fn()``.

        Must be called with ``cond`` held; ``index <= 0`` returns at once.
        """
        deadline = self.clock() + timeout
        while index > 0 and not self.closed:
            current = index_fn()
            remaining = deadline - self.clock()
            if current > index or remaining <= 0:
                return current
            self.cond.wait(remaining)
        return index_fn()

    # ---------------------------------------------------------------- sessions
    def create_session(self, rec: SessionRec) -> SessionRec:
        """Store a new session (validated by the caller); assigns ID and indexes."""
        with self.cond:
            self.raft_index += 1
            self.session_index = self.raft_index
            rec = replace(rec, id=str(uuid.uuid4()), create_index=self.raft_index,
                          modify_index=self.raft_index, expires=self._expiry(rec.ttl))
            self.sessions[rec.id] = rec
            self.cond.notify_all()
            return rec

    def _expiry(self, ttl: float | None) -> float | None:
        return None if not ttl else self.clock() + ttl * self.ttl_multiplier

    def renew_session(self, session_id: str) -> SessionRec | None:
        """Restart a session's TTL timer; None when it does not exist."""
        with self.cond:
            rec = self.sessions.get(session_id)
            if rec is None:
                return None
            rec = replace(rec, expires=self._expiry(rec.ttl))
            self.sessions[session_id] = rec
            self.cond.notify_all()
            return rec

    def destroy_session(self, session_id: str) -> None:
        """Invalidate a session now (no-op when unknown)."""
        with self.batch() as b:
            self._invalidate(b, session_id)

    def _invalidate(self, b: Batch, session_id: str) -> None:
        rec = self.sessions.pop(session_id, None)
        if rec is None:
            return
        b.dirty = True
        self.session_index = b.index
        held = [e for e in self.kv.values() if e.session == session_id]
        for entry in held:
            if rec.behavior == "delete":
                b.delete(entry.key)
            else:
                self.kv[entry.key] = replace(entry, session=None, modify_index=b._touch())
            if rec.lock_delay > 0:
                self.lock_delays[entry.key] = self.clock() + rec.lock_delay

    def reap_expired(self) -> float | None:
        """Invalidate lapsed sessions; return seconds until the next expiry (None: none)."""
        with self.batch() as b:
            now = self.clock()
            for rec in list(self.sessions.values()):
                if rec.expires is not None and rec.expires <= now:
                    self._invalidate(b, rec.id)
            pending = [r.expires for r in self.sessions.values() if r.expires is not None]
        return min(pending) - now if pending else None

    # --------------------------------------------------------------- lifecycle
    def start_reaper(self) -> None:
        """Start the background thread that expires sessions."""
        self._reaper = threading.Thread(target=self._reap_loop, name="kv-reaper", daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        while True:
            delay = self.reap_expired()
            with self.cond:
                if self.closed:
                    return
                self.cond.wait(1.0 if delay is None else min(max(delay, 0.01), 1.0))

    def resume(self, *, reset_session_timers: bool = True) -> None:
        """Accept blocking reads again after :meth:`close` (restart the reaper separately)."""
        with self.cond:
            self.closed = False
            if reset_session_timers:
                for sid, rec in self.sessions.items():
                    self.sessions[sid] = replace(rec, expires=self._expiry(rec.ttl))

    def close(self) -> None:
        """Wake every blocked reader and stop the reaper."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
