"""Checkpoint storage by URL: ``open_store(url)`` picks the backend from the URL's scheme.

Resolution order: a plain path or ``file://`` is a local directory (``FileStore``);
otherwise the scheme is looked up in ``STORES`` (built-ins ``file`` and ``lattice``, plus
third-party schemes from the ``lattice.storage`` entry-point group: the entry point's name is
the scheme and it loads a callable ``factory(url) -> Store``); a scheme fsspec knows
(``s3``, ``gs``, ``memory``, ...) falls through to ``FsspecStore``. Heavy clients are imported
only by the factory that needs them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .base import Store

StoreFactory = Callable[..., Store]
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _coerce(obj: object) -> list[StoreFactory]:
    if not callable(obj):
        raise TypeError(f"a lattice.storage entry point must load a callable factory(url) -> Store, got {obj!r}")
    return [obj]  # type: ignore[list-item]


STORES: Registry[StoreFactory] = Registry("storage backend", "lattice.storage", _coerce)


def _file(url: str, **_: Any) -> Store:
    from .file import FileStore

    return FileStore(url)


def _service(url: str, **options: Any) -> Store:
    from .service import ServiceStore

    return ServiceStore(url, **options)


STORES.add("file", _file)
STORES.add("lattice", _service)


def scheme_of(url: str) -> str | None:
    """The URL's scheme in lower case, or ``None`` for a plain path."""
    m = _SCHEME.match(str(url))
    return m.group(1).lower() if m else None


def is_remote(url: str) -> bool:
    """Whether ``url`` needs a store other than a local directory (anything but a path or ``file://``)."""
    return scheme_of(url) not in (None, "file")


def open_store(url: str, **options: Any) -> Store:
    """Open the store for ``url``; ``options`` go to the backend (fsspec storage options for fsspec URLs).

    Raises ``ConfigError`` naming the scheme if no backend handles it.
    """
    url = str(url)
    scheme = scheme_of(url)
    if scheme is None:
        return _file(url)
    if scheme in STORES:
        return STORES.get(scheme)(url, **options)
    if _fsspec_knows(scheme):
        from .fsspec_store import FsspecStore

        return FsspecStore(url, options)
    known = ", ".join(sorted(n for n, _ in STORES.items()))
    raise ConfigError(f"checkpoint_dir {url!r}: no storage backend for scheme {scheme!r} (built in: {known}, "
                      "and every fsspec protocol); install the package that provides it (fsspec plugin or a "
                      "'lattice.storage' entry point)")


def _fsspec_knows(scheme: str) -> bool:
    try:
        import fsspec
    except ImportError:
        return False
    return scheme in fsspec.available_protocols()


__all__ = ["STORES", "Store", "is_remote", "open_store", "scheme_of"]
