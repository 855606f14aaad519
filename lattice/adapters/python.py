"""Built-in adapters for plain Python: values and containers, numpy arrays, the ``Stateful``
shape (``state_dict``/``load_state_dict``), and the Python and numpy global RNGs."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from ..core.adapter import Adapter
from ..core.arrays import CODECS


def _is_plain(x: Any, depth: int = 0) -> bool:
    if x is None or isinstance(x, bool | int | float | str | bytes):
        return True
    if depth > 64:
        return False
    if isinstance(x, list | tuple) and not hasattr(x, "_fields"):
        return all(_is_plain(v, depth + 1) for v in x)
    if isinstance(x, dict):
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in x.items())
    return CODECS.find(x) is not None


class ValueAdapter(Adapter):
    """Plain values, containers of them and arrays: ``lattice.register(epoch=0, history=[])``.

    Restore returns the saved value; a registered dict or list is also updated in place,
    and arrays whose shape matches are restored into the registered arrays' memory.
    """

    name = "python.value"
    priority = 0

    def handles(self, obj: Any) -> bool:
        return _is_plain(obj)

    def save(self, obj: Any) -> Any:
        return obj

    def load(self, obj: Any, tree: Any) -> Any:
        if isinstance(obj, dict) and isinstance(tree, dict) and obj is not tree:
            obj.clear()
            obj.update(tree)
            return obj
        if isinstance(obj, list) and isinstance(tree, list) and obj is not tree:
            obj[:] = tree
            return obj
        if isinstance(obj, np.ndarray) and isinstance(tree, np.ndarray) and obj is not tree:
            if obj.shape == tree.shape and obj.dtype == tree.dtype and obj.flags.writeable:
                np.copyto(obj, tree)
                return obj
        return tree


class StatefulAdapter(Adapter):
    """Any object with ``state_dict()`` and ``load_state_dict()`` (the PyTorch ``Stateful`` shape)."""

    name = "stateful"
    priority = 10

    def handles(self, obj: Any) -> bool:
        return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))

    def save(self, obj: Any) -> Any:
        return obj.state_dict()

    def load(self, obj: Any, tree: Any) -> Any:
        obj.load_state_dict(tree)
        return obj


class PythonRNG:
    """The global RNGs of ``random`` and ``numpy.random`` (registered automatically as ``__rng__``)."""


class PythonRNGAdapter(Adapter):
    name = "python.rng"
    per_rank = True  # each rank has its own
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, PythonRNG)

    def save(self, obj: Any) -> Any:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"random": random.getstate(),
                "numpy": {"kind": kind, "keys": keys.copy(), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}

    def load(self, obj: Any, tree: Any) -> Any:
        version, internal, gauss = tree["random"]
        random.setstate((version, tuple(internal), gauss))
        n = tree["numpy"]
        np.random.set_state((n["kind"], n["keys"], n["pos"], n["has_gauss"], n["cached_gaussian"]))
        return obj


ADAPTERS = [ValueAdapter, StatefulAdapter, PythonRNGAdapter]
