"""Named factories for KV backends: ``consul``, ``embedded``, ``etcd``.

A backend is chosen by name (from the command line or a job spec), so each is a
factory in a small registry. Factories import their module only when called,
which keeps ``import lattice.runtime.kv`` light and lets third-party backends
register under their own names. An unknown name is an error that lists the
valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lattice.runtime.kv.api import KVStore, UnknownBackend

BackendFactory = Callable[..., KVStore]

_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Register ``factory`` under ``name``.

    Raises:
        ValueError: when ``name`` is taken and ``replace`` is False.
    """
    if name in _FACTORIES and not replace:
        raise ValueError(f"KV backend {name!r} is already registered")
    _FACTORIES[name] = factory


def backend_names() -> list[str]:
    """The registered backend names, sorted."""
    return sorted(_FACTORIES)


def create_backend(name: str, **options: Any) -> KVStore:
    """Build the backend registered as ``name`` with ``options``.

    Raises:
        UnknownBackend: listing the valid names.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        valid = ", ".join(backend_names()) or "(none)"
        raise UnknownBackend(f"unknown KV backend {name!r}; valid backends: {valid}")
    return factory(**options)


def _consul(url: str = "http://127.0.0.1:8500", **options: Any) -> KVStore:
    from lattice.runtime.kv.consul import ConsulKV

    return ConsulKV(url, **options)


def _embedded(url: str | None = None, *, token: str | None = None,
              min_session_ttl: float = 10.0, **options: Any) -> KVStore:
    """Connect to ``url`` if given, else start an in-process server owned by the store."""
    from lattice.runtime.kv.consul import ConsulKV

    if url is not None:
        return ConsulKV(url, token=token, **options)
    from lattice.runtime.kv.server import start_server

    handle = start_server(token=token, min_session_ttl=min_session_ttl)
    return ConsulKV(handle.url, token=token, owned_server=handle, **options)


def _etcd(url: str = "http://127.0.0.1:2379", **options: Any) -> KVStore:
    from lattice.runtime.kv.etcd import EtcdKV

    return EtcdKV(url, **options)


register_backend("consul", _consul)
register_backend("embedded", _embedded)
register_backend("etcd", _etcd)
