"""JAX adapters: arbitrary pytrees of ``jax.Array`` (optax states, linen variables, flax structs,
NamedTuples, dataclasses, PRNG keys) and flax NNX objects, plus the ``jax.Array`` codec.

JAX values are immutable, so a registered pytree is replaced rather than changed: the
training loop hands over new values with ``state.params = new_params``, and restore returns a
new pytree with the registered structure, dtypes and shardings (``state.params`` after
``register``). NNX modules and optimizers are mutable Python objects: they are restored in
place with ``nnx.update``. See ``docs/jax.md``.

The codec copies an array's addressable shards straight into the host buffer (one copy; on
an accelerator the device-to-host transfers of all leaves are started when the state is
gathered). Restore reads into host arrays that the adapter then puts on the registered
shardings. Multi-host arrays (not fully addressable from this process) are not supported.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from ..core.adapter import Adapter
from ..core.arrays import DTYPES, NumpyCodec, numpy_dtype
from ..core.errors import StateMismatchError
from . import jax_tree
from .jax_tree import is_key, is_plain, leaves, restore, to_nested


class JaxCodec(NumpyCodec):
    """``jax.Array`` leaves: snapshotted shard by shard, restored as host (numpy) arrays that the
    JAX adapters put back on the registered devices (``byte_view``/``empty``: numpy's, as a
    jax.Array is immutable and never written in place)."""

    kind = "jax"

    def handles(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def describe(self, x: Any) -> tuple[str, tuple[int, ...]]:
        if is_key(x):
            raise TypeError("a typed PRNG key array is checkpointed by the JAX pytree adapter "
                            "(register the pytree holding it, not a container of another framework)")
        if x.is_deleted():
            raise TypeError("this jax.Array was deleted (donated to a jitted function?); hand the new "
                            "value over with `state.<name> = new_value` before lattice.step()")
        if not x.is_fully_addressable:
            raise TypeError("a jax.Array that spans several processes (multi-host) is not supported; "
                            "each process can only checkpoint arrays it fully addresses")
        name = np.dtype(x.dtype).name
        if name not in DTYPES:
            raise TypeError(f"jax dtype {name} cannot be checkpointed (supported: {', '.join(DTYPES)})")
        return name, tuple(int(d) for d in x.shape)

    def copy_into(self, x: Any, dst: np.ndarray) -> None:
        out = dst.view(numpy_dtype(np.dtype(x.dtype).name)).reshape(x.shape)
        shards = x.addressable_shards
        if len(shards) == 1 or x.is_fully_replicated:
            np.copyto(out, np.asarray(x))
            return
        for shard in shards:
            if shard.replica_id == 0:  # each distinct piece once
                out[shard.index] = np.asarray(shard.data)

    def prefetch(self, x: Any) -> None:
        """Start the device-to-host copy of an accelerator array (called for every array of a
        snapshot before any is copied; nothing to do on the CPU)."""
        if isinstance(x, jax.Array) and not is_key(x) and not x.is_deleted():
            if any(d.platform != "cpu" for d in x.sharding.device_set):
                x.copy_to_host_async()

    def freeze(self, x: Any) -> np.ndarray | None:
        """A zero-copy view of a single-buffer CPU array: JAX never changes an array, and while the
        view exists it does not hand the buffer to a donating function (it copies instead)."""
        if not isinstance(x, jax.Array) or len(x.addressable_shards) != 1:
            return None
        if any(d.platform != "cpu" for d in x.sharding.device_set):
            return None
        view = np.asarray(x)
        return view if view.flags.c_contiguous else None


def _leaf_ok(x: Any) -> bool:
    return x is None or isinstance(x, jax.Array | np.ndarray | np.generic | jax_tree._SCALARS)


class PytreeAdapter(Adapter):
    """Any pytree holding ``jax.Array`` leaves (or a non-plain pytree such as a NamedTuple of
    numpy arrays): saved as nested dicts/lists, restored as a new pytree of the registered
    structure, dtypes and shardings (assign new values with ``state.<name> = ...``)."""

    name = "jax.pytree"
    priority = 90  # below framework objects (100), above `stateful` (10) and plain values (0)

    def handles(self, obj: Any) -> bool:
        try:
            return self._handles(obj)
        except (TypeError, ValueError):  # not a pytree JAX can flatten (e.g. dict keys of mixed types)
            return False

    def _handles(self, obj: Any) -> bool:
        if isinstance(obj, jax.Array):
            return True
        if _is_nnx(obj) or jax_tree.node_of(obj) is None:
            return False
        fast = jax.tree_util.tree_leaves(obj)  # the common case, checked in C++: all leaves are arrays
        if fast and all(isinstance(x, jax.Array) for x in fast):
            return True
        found = leaves(obj)
        if not all(_leaf_ok(x) for x in found):
            return False
        return any(isinstance(x, jax.Array) for x in found) or not is_plain(obj)

    def check_replace(self, old: Any, new: Any, name: str) -> None:
        """``state.<name> = new`` must keep the registered pytree structure (restore needs it)."""
        a, b = jax.tree_util.tree_structure(old), jax.tree_util.tree_structure(new)
        if a != b:
            raise StateMismatchError(
                f"state.{name}: the new value's pytree structure differs from the registered one "
                f"({str(b)[:200]} vs {str(a)[:200]}); a checkpoint restores into the registered "
                "structure, so assign values of the same structure")

    def save(self, obj: Any) -> Any:
        return to_nested(obj)

    def load(self, obj: Any, tree: Any) -> Any:
        return restore(obj, tree)


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")


def _is_nnx(obj: Any) -> bool:
    nnx = _nnx()
    if nnx is None:
        return False
    base = getattr(nnx, "Pytree", None) or getattr(nnx, "Object", None)  # flax >= 0.12 / older
    return base is not None and isinstance(obj, base)


class NnxAdapter(Adapter):
    """flax NNX modules, optimizers and ``Rngs`` (``nnx.Pytree``): ``nnx.state`` saved, restored
    in place with ``nnx.update`` onto the registered variables' shardings."""

    name = "jax.nnx"
    priority = 100

    def handles(self, obj: Any) -> bool:
        return _is_nnx(obj)

    def save(self, obj: Any) -> Any:
        return to_nested(_nnx().state(obj))

    def load(self, obj: Any, tree: Any) -> Any:
        nnx = _nnx()
        nnx.update(obj, restore(nnx.state(obj), tree))
        return obj


ARRAY_CODECS = [JaxCodec()]
ADAPTERS = [PytreeAdapter, NnxAdapter]
