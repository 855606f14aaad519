"""The key-value store interface the rendezvous is built on.

A rendezvous needs five things from a store, and nothing more: read a key with
its modify index, write with compare-and-set on that index (the index doubles as
a fencing token), list a prefix, block until something under a prefix changes
(Consul blocking queries, etcd watches; never fixed-interval polling), and
sessions/leases with a TTL whose keys vanish when the holder stops renewing.

Each store is one subclass of :class:`KVStore`; the rest of the runtime only sees
this module's types and exceptions, so the backends are interchangeable and one
contract test suite runs against all of them.

Portable contract notes:

* Indexes are opaque, monotonically increasing integers (Consul raft indexes,
  etcd revisions). Compare them only with values from the same store.
* A key bound to a session is deleted when that session is destroyed or lapses.
  What happens when a key bound to one live session is written with another is
  backend specific (Consul refuses with :class:`CASConflict`, etcd rebinds).
* ``wait`` may report a change that is not visible under the prefix (Consul
  wakes on unrelated writes when the prefix is empty); callers re-read.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field

MAX_VALUE_SIZE = 256 * 1024
"""Largest value every backend accepts (bytes).

Consul caps a value at 512 KiB, but Lattice writes through ``/v1/txn`` (to learn
the new modify index atomically) whose request cap also applies to the
base64-encoded value, so the portable limit is half of Consul's."""

_KEY_RE = re.compile(r"[A-Za-z0-9_.,/-]*")


class KVError(Exception):
    """Base class of every error a KV backend raises."""


class KVUnavailable(KVError):
    """The store cannot be reached (connection refused, reset, or timed out)."""


class CASConflict(KVError):
    """A compare-and-set lost: the key's modify index was not the expected one."""


class SessionExpired(KVError):
    """The session/lease does not exist (destroyed, expired, or never created)."""


class ValueTooLarge(KVError, ValueError):
    """A value is larger than the store (or :data:`MAX_VALUE_SIZE`) allows."""


class InvalidKey(KVError, ValueError):
    """A key or prefix uses characters or a shape Lattice does not allow."""


class PermissionDenied(KVError):
    """The store refused the request's ACL token (HTTP 403)."""


class UnknownBackend(KVError, ValueError):
    """No backend is registered under the requested name."""


@dataclass(frozen=True)
class KVEntry:
    """One stored key.

    Attributes:
        key: the key name.
        value: the raw value bytes.
        mod_index: index of the last write to this key (the CAS token).
        create_index: index at which the key was created.
        session: id of the session the key is bound to, if any (Consul only
            reports it; etcd reports the lease id as a decimal string).
    """

    key: str
    value: bytes
    mod_index: int
    create_index: int = 0
    session: str | None = None


@dataclass(frozen=True)
class Listing:
    """The entries under a prefix and the index to pass to :meth:`KVStore.wait`."""

    entries: list[KVEntry] = field(default_factory=list)
    index: int = 0

    def as_dict(self) -> dict[str, bytes]:
        """Return ``{key: value}`` for the listed entries."""
        return {e.key: e.value for e in self.entries}


@dataclass(frozen=True)
class WaitResult:
    """Outcome of :meth:`KVStore.wait`.

    Attributes:
        changed: True when the store reported a change after the given index;
            False when the timeout passed first.
        index: the index to pass to the next ``wait`` call.
    """

    changed: bool
    index: int


@dataclass(frozen=True)
class Session:
    """A session (Consul) or lease (etcd) with a TTL in seconds, as granted."""

    id: str
    ttl: float


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Check a key (or prefix) against Lattice's portable key rules.

    Keys use ``[A-Za-z0-9_.,/-]``, must not start with ``/``, and contain no
    ``..`` segment and no ``//``. A prefix may be empty; a key may not.

    Raises:
        InvalidKey: naming the rule that was broken.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, got {type(key).__name__}")
    if not key and not prefix:
        raise InvalidKey("key must not be empty")
    if not _KEY_RE.fullmatch(key):
        raise InvalidKey(f"key {key!r} has characters outside [A-Za-z0-9_.,/-]")
    if key.startswith("/") or "//" in key:
        raise InvalidKey(f"key {key!r} must not start with '/' or contain '//'")
    if ".." in key.split("/"):
        raise InvalidKey(f"key {key!r} must not contain a '..' segment")
    return key


def check_value(value: bytes) -> bytes:
    """Return ``value`` as bytes after checking its type and size.

    Raises:
        TypeError: when ``value`` is not bytes-like.
        ValueTooLarge: when it is larger than :data:`MAX_VALUE_SIZE`.
    """
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"value must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) > MAX_VALUE_SIZE:
        raise ValueTooLarge(f"value of {len(value)} bytes exceeds {MAX_VALUE_SIZE} bytes")
    return value


class KVStore(abc.ABC):
    """A key-value store with CAS, prefix listing, blocking waits and sessions.

    Backends are thread-safe: the rendezvous renews its session on one thread
    while waiting on another. Use as a context manager or call :meth:`close`.
    """

    @abc.abstractmethod
    def get(self, key: str) -> KVEntry | None:
        """Return the entry for ``key``, or None when it does not exist."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes, *, session: str | None = None) -> int:
        """Write ``value`` unconditionally; return the key's new modify index.

        With ``session`` the key is bound to that session and deleted when it
        ends. Raises :class:`SessionExpired` when the session is gone.
        """

    @abc.abstractmethod
    def cas(self, key: str, value: bytes, index: int, *, session: str | None = None) -> int:
        """Write only if the key's modify index equals ``index``.

        ``index=0`` means create-only (the key must not exist). Returns the new
        modify index; raises :class:`CASConflict` when the check fails.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, index: int | None = None) -> None:
        """Delete ``key`` (no error when absent).

        With ``index`` (>= 1) delete only if the key exists with that modify
        index, else raise :class:`CASConflict`.
        """

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key that starts with ``prefix``."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Listing:
        """Return the entries under ``prefix`` (sorted by key) and a wait index."""

    @abc.abstractmethod
    def wait(self, prefix: str, index: int, timeout: float) -> WaitResult:
        """Block until something under ``prefix`` changes after ``index``.

        Returns at the first change (``changed=True``) or after ``timeout``
        seconds (``changed=False``). A key is its own prefix.
        """

    @abc.abstractmethod
    def create_session(self, ttl: float, *, name: str = "lattice") -> Session:
        """Create a session/lease that lapses ``ttl`` seconds after its last renewal."""

    @abc.abstractmethod
    def renew_session(self, session_id: str) -> float:
        """Renew a session; return the TTL granted. Raises :class:`SessionExpired`."""

    @abc.abstractmethod
    def destroy_session(self, session_id: str) -> None:
        """End a session now, deleting its keys. Idempotent."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release resources held by the backend (idempotent)."""

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
