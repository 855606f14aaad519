"""The agent's session and its membership key, kept alive by a background thread.

The membership key ``lattice/<job>/members/<node>`` is bound to the session, so
the key (and with it the agent's place in the job) disappears within the TTL
once the agent stops renewing. The keepalive thread renews every ``ttl/3``;
when the store is unreachable it retries with a bounded exponential backoff.
If the session lapsed meanwhile (:class:`SessionExpired`) a new session is
created and the key is put again: peers saw the key vanish, so the current
round is over and the next one starts (the handler reports this as a
:class:`~lattice.runtime.rendezvous.api.PeerLost` naming this agent).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from lattice.runtime.kv.api import KVStore, KVUnavailable, Session, SessionExpired


class Backoff:
    """Exponential backoff with jitter: ``first``, doubling up to ``cap`` seconds."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap = first, cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.75, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class MemberSession:
    """Own a session and the membership key bound to it.

    Args:
        store: the KV store.
        key: the membership key.
        value: the membership value (JSON bytes).
        ttl: session TTL in seconds.
        log: a logger (adapter) that names job, node and round.
        on_lapse: called (from any thread) after a lapsed session was replaced.
    """

    def __init__(self, store: KVStore, key: str, value: bytes, ttl: float,
                 log: logging.LoggerAdapter, on_lapse: Callable[[], None]) -> None:
        self._store, self._key, self._value, self._ttl = store, key, value, ttl
        self._log, self._on_lapse = log, on_lapse
        self._lock = threading.Lock()
        self._session: Session | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def id(self) -> str | None:
        with self._lock:
            return self._session.id if self._session else None

    def open(self) -> None:
        """Create the session, put the key and start the keepalive (raises KVUnavailable)."""
        with self._lock:
            if self._session is None:
                self._session = self._store.create_session(self._ttl, name=self._key)
                self._store.put(self._key, self._value, session=self._session.id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._keepalive, daemon=True,
                                            name=f"rdzv-keepalive-{self._key}")
            self._thread.start()

    def ensure_key(self) -> None:
        """Put the membership key again (after it vanished); replaces a lapsed session."""
        sid = self.id
        if sid is None:
            return self.open()
        try:
            self._store.put(self._key, self._value, session=sid)
        except SessionExpired:
            self.replace(sid)

    def replace(self, lapsed: str | None) -> None:
        """Create a new session and re-put the key, unless another thread already did."""
        with self._lock:
            if self._stop.is_set() or (self._session and self._session.id != lapsed):
                return
            self._log.warning("session %s lapsed; creating a new one (the round moves on)", lapsed)
            self._session = self._store.create_session(self._ttl, name=self._key)
            self._store.put(self._key, self._value, session=self._session.id)
        self._on_lapse()

    def stop_keepalive(self) -> None:
        """Stop renewing (the session then lapses within its TTL)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        """Stop renewing and destroy the session, so the key vanishes at once."""
        self.stop_keepalive()
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            try:
                self._store.destroy_session(session.id)
            except KVUnavailable as exc:
                self._log.warning("could not destroy session %s (it will lapse): %s",
                                  session.id, exc)

    def _keepalive(self) -> None:
        interval = max(self._ttl / 3, 0.05)
        backoff = Backoff(cap=max(interval / 2, 0.05))
        delay = interval
        while not self._stop.wait(delay):
            delay = interval
            sid = self.id
            if sid is None:
                continue
            try:
                self._store.renew_session(sid)
                backoff.reset()
            except SessionExpired:
                self._replace_quietly(sid)
            except KVUnavailable as exc:
                delay = backoff.next()
                self._log.warning("renewing session failed (retry in %.2fs): %s", delay, exc)

    def _replace_quietly(self, sid: str) -> None:
        try:
            self.replace(sid)
        except KVUnavailable as exc:
            self._log.warning("re-creating the session failed (will retry): %s", exc)
        except SessionExpired:
            pass
