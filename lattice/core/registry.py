"""A small generic registry of named plugins, with entry-point loading that never hides a failure.

One registry shape serves adapters, rendezvous backends and storage backends. Built-ins
and entry-point plugins merge; a plugin that fails to load is logged, warned about and
kept in ``errors`` so ``lattice`` can show it, never silently dropped.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

from .errors import ConfigError

log = logging.getLogger("lattice")
T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries plus lazily loaded entry-point plugins.

    Args:
        kind: what the entries are, for messages ("adapter", "storage backend").
        group: the entry-point group plugins register under (``lattice.adapters``).
        coerce: turns whatever an entry point loads into zero or more entries.
    """

    def __init__(self, kind: str, group: str | None, coerce: Callable[[object], list[T]]):
        self.kind, self.group, self._coerce = kind, group, coerce
        self._entries: dict[str, T] = {}
        self._order: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self._plugins_loaded = group is None
        self._lock = threading.RLock()

    def add(self, name: str, entry: T, *, replace: bool = False) -> None:
        with self._lock:
            if name in self._entries and not replace and self._entries[name] is not entry:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pass replace=True to override it")
            if name in self._order:
                self._order.remove(name)
            self._entries[name] = entry
            self._order.append(name)

    def get(self, name: str) -> T:
        self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return name in self._entries

    def items(self) -> Iterator[tuple[str, T]]:
        """Entries, most recently registered first."""
        self.load_plugins()
        with self._lock:
            order = list(reversed(self._order))
        return ((n, self._entries[n]) for n in order)

    def load_plugins(self) -> None:
        """Load every entry point of ``group`` once; failures go to ``errors`` and the log."""
        if self._plugins_loaded:
            return
        with self._lock:
            if self._plugins_loaded:
                return
            self._plugins_loaded = True
            for ep in metadata.entry_points(group=self.group):
                self._load_one(ep)

    def _load_one(self, ep: metadata.EntryPoint) -> None:
        try:
            for entry in self._coerce(ep.load()):
                self.add(getattr(entry, "name", ep.name), entry, replace=True)
        except Exception as exc:  # a broken plugin must not take the others down
            msg = f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            self.errors.append((ep.name, msg))
            log.error(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
