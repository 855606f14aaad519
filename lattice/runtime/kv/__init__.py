"""Key-value stores for rendezvous: one interface, Consul / embedded / etcd backends.

``create_backend("embedded")`` gives a working store with nothing installed;
``create_backend("consul", url=...)`` and ``create_backend("etcd", url=...)``
talk to real clusters. See :mod:`lattice.runtime.kv.api` for the contract.
"""

from lattice.runtime.kv.api import (
    MAX_VALUE_SIZE,
    CASConflict,
    InvalidKey,
    KVEntry,
    KVError,
    KVStore,
    KVUnavailable,
    Listing,
    PermissionDenied,
    Session,
    SessionExpired,
    UnknownBackend,
    ValueTooLarge,
    WaitResult,
)
from lattice.runtime.kv.registry import backend_names, create_backend, register_backend

__all__ = [
    "MAX_VALUE_SIZE",
    "CASConflict",
    "InvalidKey",
    "KVEntry",
    "KVError",
    "KVStore",
    "KVUnavailable",
    "Listing",
    "PermissionDenied",
    "Session",
    "SessionExpired",
    "UnknownBackend",
    "ValueTooLarge",
    "WaitResult",
    "backend_names",
    "create_backend",
    "register_backend",
]
