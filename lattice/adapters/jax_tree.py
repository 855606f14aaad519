"""JAX pytrees <-> nested plain containers, and restore into the structure of a live pytree.

A pytree is saved as nested dicts and lists that mirror its key paths: a node whose children
have sequence keys (tuples, lists) becomes a list, any other node (dicts, ``FrozenDict``,
NamedTuples, dataclasses, flax structs, ``nnx.State``) a dict keyed by its dict keys or
attribute names. So tensor names read like ``params/params/Dense_0/kernel`` and
``opt_state/0/mu/...``, and the same nesting is what orbax writes. An empty node is saved as
``{}``, ``[]`` or ``None`` (a NamedTuple such as optax's ``EmptyState``), as orbax does.

Restore walks the *live* pytree (the registered one) and rebuilds it node by node with its
own tree definition, so the result has exactly the registered structure, static fields and
dtypes; arrays are placed on the live arrays' shardings. A typed PRNG key is saved as
``{"__prng_key__": impl, "key_data": uint32 array}``. Plain (unregistered) dataclasses are
nodes of their fields; an ``nnx.Variable`` is transparent (its value stands in its place).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ..core.errors import StateMismatchError
from ..core.tree import path_str

tu = jax.tree_util
PRNG = "__prng_key__"
KEY_DATA = "key_data"
_SCALARS = bool | int | float | complex | str | bytes


@dataclasses.dataclass
class Node:
    """One pytree node: its children, their keys, and how to rebuild it from new children."""

    keys: list[Any]
    children: list[Any]
    sequence: bool
    rebuild: Callable[[list[Any]], Any]
    empty: Any = None
    transparent: bool = False  # an nnx Variable: its single value stands in for it


def is_key(x: Any) -> bool:
    """True for a new-style typed PRNG key array (``jax.random.key``)."""
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key(k: Any) -> Any:
    for attr in ("idx", "key", "name"):  # SequenceKey, DictKey / FlattenedIndexKey, GetAttrKey
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _is_variable(x: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def _dataclass_node(x: Any) -> Node:
    names = [f.name for f in dataclasses.fields(x)]

    def rebuild(values: list[Any]) -> Any:
        new = copy.copy(x)
        for name, value in zip(names, values, strict=True):
            object.__setattr__(new, name, value)  # works for frozen dataclasses too
        return new

    return Node(names, [getattr(x, n) for n in names], False, rebuild)


def node_of(x: Any) -> Node | None:
    """The node ``x`` is, or ``None`` if ``x`` is a leaf (an array, a scalar, ``None``, an object)."""
    if x is None or isinstance(x, jax.Array | np.ndarray | np.generic | _SCALARS):
        return None
    kids, treedef = tu.tree_flatten_with_path(x, is_leaf=lambda n: n is not x)
    if len(kids) == 1 and kids[0][0] == ():  # JAX sees a leaf (an empty node has no children)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return _dataclass_node(x)
        return None
    keys = [_key(path[0]) for path, _ in kids]
    sequence = all(isinstance(path[0], tu.SequenceKey | tu.FlattenedIndexKey) for path, _ in kids)
    if isinstance(x, dict):
        empty: Any = {}
    elif isinstance(x, list | tuple) and not hasattr(x, "_fields"):
        empty = []
    else:
        empty = None
    return Node(keys, [c for _, c in kids], sequence, treedef.unflatten, empty,
                transparent=len(kids) == 1 and _is_variable(x))


def leaves(x: Any) -> list[Any]:
    """Every leaf of ``x`` by the walk above (``None`` counts as a leaf)."""
    node = node_of(x)
    if node is None:
        return [x]
    return [leaf for c in node.children for leaf in leaves(c)]


def is_plain(x: Any) -> bool:
    """True if ``x`` is built only from dict / list / tuple (no NamedTuple) and leaves."""
    if isinstance(x, dict):
        return all(is_plain(v) for v in x.values())
    if isinstance(x, list | tuple) and not hasattr(x, "_fields"):
        return all(is_plain(v) for v in x)
    return node_of(x) is None


def to_nested(x: Any) -> Any:
    """The nested dict/list form of pytree ``x`` (arrays kept as they are, typed keys unwrapped)."""
    node = node_of(x)
    if node is None:
        if is_key(x):
            return {PRNG: str(jax.random.key_impl(x)), KEY_DATA: jax.random.key_data(x)}
        return x
    if node.transparent:
        return to_nested(node.children[0])
    if not node.children:
        return node.empty
    values = [to_nested(c) for c in node.children]
    return values if node.sequence else dict(zip(node.keys, values, strict=True))


def _where(item: str, path: tuple[Any, ...]) -> str:
    key = path_str(path)
    return f"item {item!r}, key {key!r}" if item else f"pytree key {key!r}"


def _child(saved: Any, key: Any, item: str, path: tuple[Any, ...]) -> Any:
    """``saved[key]``, accepting the forms orbax gives back (lists, string keys)."""
    if isinstance(saved, list | tuple) and isinstance(key, int) and 0 <= key < len(saved):
        return saved[key]
    if isinstance(saved, dict):
        if key in saved:
            return saved[key]
        if str(key) in saved:
            return saved[str(key)]
    raise StateMismatchError(f"{_where(item, path + (key,))}: not in the checkpoint "
                             f"(registered structure and checkpoint differ)")


def _check_no_extra(saved: Any, keys: list[Any], item: str, path: tuple[Any, ...]) -> None:
    if isinstance(saved, dict):
        known = set(keys) | {str(k) for k in keys}
        extra = sorted(str(k) for k in saved if k not in known and str(k) not in known)
    elif isinstance(saved, list | tuple):
        extra = [str(i) for i in range(len(keys), len(saved))]
    else:
        extra = []
    if extra:
        raise StateMismatchError(f"{_where(item, path)}: the checkpoint has {extra[:10]} that the "
                                 "registered pytree lacks; register the same structure that was saved")


def restore(live: Any, saved: Any, item: str = "", path: tuple[Any, ...] = ()) -> Any:
    """Rebuild ``live`` with the values of ``saved`` (its nested form, or what orbax returns)."""
    node = node_of(live)
    if node is None:
        return restore_leaf(live, saved, item, path)
    if node.transparent:
        if isinstance(saved, dict) and set(saved) == {"value"}:
            saved = saved["value"]  # orbax writes an nnx Variable as {"value": array}
        return node.rebuild([restore(node.children[0], saved, item, path)])
    if not node.children:
        return live
    values = [restore(c, _child(saved, k, item, path), item, path + (k,))
              for k, c in zip(node.keys, node.children, strict=True)]
    _check_no_extra(saved, node.keys, item, path)
    return node.rebuild(values)


def _put(value: Any, like: jax.Array) -> jax.Array:
    """``value`` as a JAX array on ``like``'s sharding (uncommitted if ``like`` was)."""
    if getattr(like, "_committed", True):
        return jax.device_put(value, like.sharding)
    return jax.device_put(value)


def _restore_key(live: jax.Array, saved: Any, item: str, path: tuple[Any, ...]) -> jax.Array:
    impl = str(jax.random.key_impl(live))
    if is_key(saved):
        saved_impl, data = str(jax.random.key_impl(saved)), jax.random.key_data(saved)
    elif isinstance(saved, dict) and KEY_DATA in saved:
        saved_impl, data = saved.get(PRNG, impl), saved[KEY_DATA]
    elif hasattr(saved, "dtype") and np.dtype(saved.dtype) == np.uint32:
        saved_impl, data = impl, saved  # bare key data (orbax read back as plain arrays)
    else:
        raise StateMismatchError(f"{_where(item, path)}: the registered value is a typed PRNG key "
                                 f"({impl}), the checkpoint has {type(saved).__name__}")
    if saved_impl != impl:
        raise StateMismatchError(f"{_where(item, path)}: the checkpoint has a {saved_impl} key, the "
                                 f"registered key is {impl}; register a key of the same impl")
    data = np.asarray(data)
    expect = jax.random.key_data(live)
    if data.shape != expect.shape or data.dtype != expect.dtype:
        raise StateMismatchError(f"{_where(item, path)}: key data {data.dtype}{list(data.shape)} does not "
                                 f"fit the registered key ({expect.dtype}{list(expect.shape)})")
    return _put(jax.random.wrap_key_data(data, impl=impl), live)


def restore_leaf(live: Any, saved: Any, item: str = "", path: tuple[Any, ...] = ()) -> Any:
    """One leaf: same type, dtype, shape (and sharding) as ``live``, values of ``saved``."""
    if is_key(live):
        return _restore_key(live, saved, item, path)
    if isinstance(live, jax.Array | np.ndarray | np.generic):
        if not hasattr(saved, "dtype") or not hasattr(saved, "shape"):
            raise StateMismatchError(f"{_where(item, path)}: the registered value is an array, "
                                     f"the checkpoint has {type(saved).__name__}")
        if (np.dtype(saved.dtype), tuple(saved.shape)) != (np.dtype(live.dtype), tuple(live.shape)):
            raise StateMismatchError(
                f"{_where(item, path)}: the checkpoint has {np.dtype(saved.dtype)}{list(saved.shape)}, "
                f"the registered array is {np.dtype(live.dtype)}{list(live.shape)}")
        if isinstance(live, jax.Array):
            return _put(saved, live)
        if isinstance(live, np.generic):
            return np.asarray(saved)[()]
        return saved if isinstance(saved, np.ndarray) else np.asarray(saved)
    if isinstance(live, bool | int | float) and hasattr(saved, "shape") and saved.shape == ():
        return type(live)(np.asarray(saved).item())  # orbax may give python scalars back as 0-d arrays
    return saved
