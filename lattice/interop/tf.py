"""TensorFlow checkpoint interoperability: ``tf.train.Checkpoint`` in and out of Lattice.

Live objects (the usual case): ``restore_tf_checkpoint(src)`` loads a checkpoint written by
``tf.train.Checkpoint(model=..., optimizer=...)`` into the objects registered under the same
names, matched by TensorFlow's own object graph (so Keras models, optimizers, ``tf.Module``,
generators and ``tf.data`` iterators all work); ``save_tf_checkpoint(out)`` writes them as one.

Offline (``lattice ckpt export|import --format tf``): ``export_tf`` turns a Lattice checkpoint
directory into a ``tf.train.Checkpoint`` with one child per item, ``import_tf`` does the
reverse. Names follow the object graph: a ``tf.Module`` item ``model`` with ``dense/kernel``
becomes ``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``, which is what
``tf.train.Checkpoint(model=module)`` reads back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core import inspect as _inspect
from ..core.adapter import Adapter, AdapterRegistry
from ..core.arrays import Codecs
from ..core.errors import CheckpointError, ConfigError, StateMismatchError
from ..core.restore import read_manifest, restore_from
from ..core.snapshot import Item
from . import write_checkpoint

log = logging.getLogger("lattice")
_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


# -- live objects ------------------------------------------------------------------------
def _trackables(objects: dict[str, Any] | None, session: Any) -> dict[str, Any]:
    import tensorflow as tf

    if objects is None:
        if session is None:
            import lattice

            session = lattice.session()
        objects = {n: i.obj for n, i in session.items.items() if not n.startswith("_")}
    found = {n: o for n, o in objects.items() if isinstance(o, tf.__internal__.tracking.Trackable)}
    if not found:
        raise ConfigError("no TensorFlow or Keras object is registered (or given): register the model "
                          "and optimizer first, or pass objects={'model': model, ...}")
    return found


def restore_tf_checkpoint(src: str | os.PathLike[str], objects: dict[str, Any] | None = None, *,
                          session: Any = None, strict: bool = True) -> list[str]:
    """Load a ``tf.train.Checkpoint`` written by TensorFlow into live objects.

    Args:
        src: the checkpoint prefix (``.../ckpt-3``) or a directory (its newest checkpoint).
        objects: ``{name: object}`` as the checkpoint was written (``tf.train.Checkpoint(name=obj)``);
            default: the TensorFlow/Keras objects registered with Lattice, by their names.
        strict: raise ``StateMismatchError`` if a variable of the objects is not in the checkpoint.
    Returns the names that were loaded. Follow with ``lattice.checkpoint()`` to keep the result.
    """
    import tensorflow as tf

    objs = _trackables(objects, session)
    prefix = tf.train.latest_checkpoint(str(src)) if os.path.isdir(src) else str(src)
    if prefix is None:
        raise ConfigError(f"{str(src)!r} holds no tf.train.Checkpoint (no 'checkpoint' index file)")
    status = tf.train.Checkpoint(**objs).read(prefix)
    if strict:
        try:
            status.assert_existing_objects_matched()
        except AssertionError as exc:
            raise StateMismatchError(f"{prefix}: the checkpoint does not cover the objects "
                                     f"{sorted(objs)}: {str(exc)[:500]}") from None
    status.expect_partial()
    log.info("loaded tf.train.Checkpoint %s into %s", prefix, sorted(objs))
    return sorted(objs)


def save_tf_checkpoint(out: str | os.PathLike[str], objects: dict[str, Any] | None = None, *,
                       session: Any = None) -> str:
    """Write live objects (default: the registered TensorFlow/Keras ones) as a ``tf.train.Checkpoint``
    at prefix ``out``; returns the prefix, readable by ``tf.train.Checkpoint(**same names).read``."""
    import tensorflow as tf

    return tf.train.Checkpoint(**_trackables(objects, session)).write(str(out))


# -- offline: a Lattice checkpoint directory <-> a tf.train.Checkpoint ----------------------
class _Reader:
    """Stands in for an adapter while reading a checkpoint without live objects."""

    def __init__(self, name: str, per_rank: bool):
        self.name, self.per_rank = name, per_rank

    def save(self, obj: Any) -> Any:
        return None

    def load(self, obj: Any, tree: Any) -> Any:
        return tree


def read_items(ckpt_dir: str | os.PathLike[str], step: int | None = None) -> tuple[int, dict[str, tuple[str, Any]]]:
    """Every item of a Lattice checkpoint as ``{name: (adapter name, tree of numpy arrays)}``,
    verified by checksum; no framework is needed. Returns the step too."""
    path = _inspect.find(ckpt_dir, step)
    manifest = read_manifest(path)
    items = {n: Item(_Reader(info["adapter"], info.get("scope") == "rank"), None)
             for n, info in manifest["items"].items()}
    restored = restore_from(path, items, Codecs())
    return restored.step, {n: (items[n].adapter.name, t) for n, t in restored.objects.items()}


def _export_tree(adapter: str, tree: Any) -> Any:
    """The structure to write for one item: nested dicts of arrays, named as TensorFlow would."""
    if adapter == "tf.module" and isinstance(tree, dict):
        nested: dict[str, Any] = {}
        for key, value in tree.items():
            *parents, last = str(key).split("/")
            node = nested
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        return nested
    if adapter == "tf.random.generator":
        return {"_state_var": tree["state"]}
    if adapter == "tf.data.iterator":
        return None  # a serialized iterator is not a variable; see docs/tensorflow.md
    return tree


def _to_trackable(value: Any, where: str, skipped: list[str]) -> Any:
    import tensorflow as tf

    if isinstance(value, dict | list | tuple):
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        node = tf.__internal__.tracking.AutoTrackable()  # no reserved attributes, unlike tf.Module
        for key, child in pairs:
            converted = _to_trackable(child, f"{where}/{key}", skipped)
            if converted is not None:
                setattr(node, str(key), converted)
        return node
    if isinstance(value, np.ndarray | np.generic | bool | int | float):
        return tf.Variable(np.asarray(value), trainable=False)
    skipped.append(where)
    return None


def export_tf(ckpt_dir: str | os.PathLike[str], out: str | os.PathLike[str], step: int | None = None, *,
              include_internal: bool = False) -> str:
    """Write a Lattice checkpoint (newest, or ``step``) as a ``tf.train.Checkpoint`` at prefix ``out``.

    Each item becomes a child of the root named like the item; dicts and lists become children
    by key and index, arrays and numbers variables (strings and ``None`` are left out, logged).
    ``tf.Module``, ``tf.Variable`` and ``tf.random.Generator`` items come out exactly as
    ``tf.train.Checkpoint(name=obj)`` writes them; Keras items as ``name/variables/<i>``
    (``model.variables`` order). Items whose names start with ``_`` (Lattice's own RNG capture)
    are left out unless ``include_internal``. Returns the prefix written.
    """
    import tensorflow as tf

    got_step, items = read_items(ckpt_dir, step)
    children: dict[str, Any] = {}
    skipped: list[str] = []
    for name, (adapter, tree) in sorted(items.items()):
        if name.startswith("_") and not include_internal:
            continue
        node = _to_trackable(_export_tree(adapter, tree), name, skipped)
        if node is None:
            skipped.append(name)
        else:
            children[name.strip("_") or "item"] = node
    if not children:
        raise CheckpointError(f"checkpoint step {got_step} in {ckpt_dir} has no arrays to export")
    if skipped:
        log.info("export_tf: left out values that are not arrays or numbers: %s", skipped[:20])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return tf.train.Checkpoint(**children).write(str(out))


def _unescape(segment: str) -> str:
    return segment.replace(".S", "/").replace("..", ".")  # TensorFlow's escaping of child names


def _import_items(prefix: str) -> dict[str, tuple[str, Any]]:
    """A TF checkpoint's variables grouped per top-level child, with the adapter that loads each."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    groups: dict[str, dict[str, Any]] = {}
    for key in sorted(reader.get_variable_to_shape_map()):
        if not key.endswith(_VALUE) or ".OPTIMIZER_SLOT" in key:
            continue  # the object graph, iterator states, TF1 optimizer slots
        parts = [_unescape(p) for p in key[:-len(_VALUE)].split("/")]
        groups.setdefault(parts[0], {})["/".join(parts[1:])] = reader.get_tensor(key)
    items: dict[str, tuple[str, Any]] = {}
    for name, values in groups.items():
        if set(values) == {""}:
            items[name] = ("tf.variable", values[""])
        elif set(values) == {"_state_var"}:
            state = values["_state_var"]
            items[name] = ("tf.random.generator", {"algorithm": 1 if state.shape == (3,) else 2, "state": state})
        else:
            items[name] = ("tf.module", values)
    return items


class _Fixed(Adapter):
    """Writes one imported tree under a given adapter name."""

    def __init__(self, name: str, per_rank: bool):
        self.name, self.per_rank = name, per_rank

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, _Imported) and obj.adapter == self.name

    def save(self, obj: Any) -> Any:
        return obj.tree

    def load(self, obj: Any, tree: Any) -> Any:
        return obj


class _Imported:
    def __init__(self, adapter: str, tree: Any):
        self.adapter, self.tree = adapter, tree


def import_tf(src: str | os.PathLike[str], ckpt_dir: str | os.PathLike[str], step: int | None = None) -> Path:
    """Write a ``tf.train.Checkpoint`` (prefix or directory) as a Lattice checkpoint in ``ckpt_dir``.

    Each top-level child becomes an item of that name: a bare variable a ``tf.variable`` item,
    a generator a ``tf.random.generator`` item, anything else a ``tf.module`` item keyed by
    object-graph path, so ``lattice.register(model=module)`` restores it. ``step`` defaults to
    the checkpoint's ``save_counter`` (else 0). Keras models and optimizers are named by TF's
    object graph, not by position: load those with ``restore_tf_checkpoint`` into the live
    objects instead. Returns the committed checkpoint directory.
    """
    import tensorflow as tf

    prefix = tf.train.latest_checkpoint(str(src)) if os.path.isdir(src) else str(src)
    if prefix is None:
        raise ConfigError(f"{str(src)!r} holds no tf.train.Checkpoint (no 'checkpoint' index file)")
    items = _import_items(prefix)
    counter = items.pop("save_counter", None)
    if not items:
        raise CheckpointError(f"{prefix} has no variables to import")
    registry = AdapterRegistry((), Codecs())
    for adapter in {a for a, _ in items.values()}:
        registry.register(_Fixed(adapter, adapter == "tf.random.generator"))
    step_ = int(step if step is not None else (counter[1] if counter is not None else 0))
    return write_checkpoint(ckpt_dir, registry, registry.codecs,
                            {n: _Imported(a, t) for n, (a, t) in items.items()}, step_)
