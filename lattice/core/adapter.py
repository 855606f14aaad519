"""The adapter protocol and the adapter registry.

An adapter turns one kind of object into a tree of arrays and plain values (``save``)
and loads such a tree back into the object in place (``load``). Its ``name`` is recorded
per item in every checkpoint and is used to find the adapter again on restore.

Resolution order: when an object is registered, the adapters are asked ``handles(obj)``
from the highest ``priority`` down; among equal priorities, the most recently registered
adapter is asked first, so a plugin can override a built-in by registering with the same
or a higher priority. Built-ins and plugins (entry-point group ``lattice.adapters``) merge.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

from .arrays import CODECS, Codecs
from .errors import ConfigError, UnsupportedObjectError
from .registry import Registry


class Adapter:
    """Base class for adapters (duck typing works too: these five members are the protocol).

    Attributes:
        name: unique, stable name recorded in checkpoints, e.g. ``"torch.module"``.
        priority: higher is asked first (framework adapters 100, generic ones below).
        per_rank: True if each rank of a multi-process job has its own state of this kind
            (RNG, data position): written per rank. False (replicated, written once by rank 0).
    """

    name: str = ""
    priority: int = 50
    per_rank: bool = False

    def handles(self, obj: Any) -> bool:
        """True if this adapter can save and load ``obj``."""
        raise NotImplementedError

    def attach(self, obj: Any) -> Any:
        """Called once when ``obj`` is registered; may prepare it (e.g. start tracking)."""
        return obj

    def companions(self, obj: Any) -> dict[str, Any]:
        """Objects ``obj`` holds that must be registered with it, by suffix (``name_suffix``).

        Optional: for state with another scope, e.g. a per-rank loader's replicated sampler.
        """
        return {}

    def save(self, obj: Any) -> Any:
        """Return the state of ``obj`` as a tree of dict/list/tuple, plain values and arrays.

        Arrays may alias ``obj``'s memory: the snapshot copies them before training resumes.
        """
        raise NotImplementedError

    def load(self, obj: Any, tree: Any) -> Any:
        """Load ``tree`` (as returned by ``save``) into ``obj``; return the restored object.

        In-place adapters return ``obj``; adapters of immutable values return a new value.
        Array leaves that matched ``obj``'s own arrays were already read into them.
        """
        raise NotImplementedError


_REQUIRED = ("name", "handles", "save", "load")


def _coerce(loaded: object) -> list[Any]:
    """An entry point may name an adapter class, an instance, or a list of either."""
    items = loaded if isinstance(loaded, list | tuple) else [loaded]
    out = []
    for item in items:
        adapter = item() if isinstance(item, type) else item
        missing = [m for m in _REQUIRED if not hasattr(adapter, m)]
        if missing or not getattr(adapter, "name", ""):
            raise TypeError(f"{item!r} is not an adapter: missing {missing or ['a non-empty name']}")
        out.append(adapter)
    return out


class AdapterRegistry:
    """Built-in adapters (loaded when their framework is imported) plus plugins."""

    def __init__(self, builtins: Iterable[tuple[str, str | None]] = (), codecs: Codecs = CODECS):
        self._registry: Registry[Any] = Registry("adapter", "lattice.adapters", _coerce)
        self._pending_builtins = list(builtins)  # (module, framework module it needs)
        self.codecs = codecs

    @property
    def errors(self) -> list[tuple[str, str]]:
        return self._registry.errors

    def register(self, adapter: Any, *, replace: bool = False) -> Any:
        """Register an adapter class or instance; returns it (usable as a class decorator)."""
        for a in _coerce(adapter):
            self._registry.add(a.name, a, replace=replace)
        return adapter

    def _load_builtins(self) -> None:
        """Import each built-in adapter module whose framework is imported; register its
        ``ADAPTERS`` (classes) and ``ARRAY_CODECS`` (codec instances)."""
        still = []
        for name, needs in self._pending_builtins:
            if needs is None or needs in sys.modules:
                module = importlib.import_module(name)
                for codec in getattr(module, "ARRAY_CODECS", ()):
                    self.codecs.add(codec)
                for adapter in getattr(module, "ADAPTERS", ()):
                    self.register(adapter, replace=True)
            else:
                still.append((name, needs))
        self._pending_builtins = still

    def all(self) -> list[Any]:
        if self._pending_builtins:
            self._load_builtins()
        entries = [a for _, a in self._registry.items()]
        return sorted(entries, key=lambda a: -getattr(a, "priority", 0))  # stable: recent first

    def resolve(self, obj: Any, item: str = "") -> Any:
        for adapter in self.all():
            if adapter.handles(obj):
                return adapter
        if isinstance(obj, dict | list | tuple):
            from .tree import encode

            encode(obj, self.codecs, item=item)  # raises, naming the unsupported leaf and its path
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise UnsupportedObjectError(
            f"no adapter handles {item + ': ' if item else ''}{kind}. Give the object "
            "state_dict()/load_state_dict() methods, or write an adapter (subclass "
            "lattice.Adapter) and add it with lattice.register_adapter(...) or the "
            "'lattice.adapters' entry-point group; see docs/adapters.md"
        )

    def by_name(self, name: str) -> Any:
        self.all()
        try:
            return self._registry.get(name)
        except ConfigError:
            known = ", ".join(sorted(a.name for a in self.all()))
            raise UnsupportedObjectError(
                f"this checkpoint was written with adapter {name!r}, which is not available here "
                f"(known: {known}); install or import the package that provides it"
            ) from None

