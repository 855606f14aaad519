"""orbax-checkpoint interop: export a Lattice checkpoint as an orbax checkpoint, and read an orbax
checkpoint into Lattice (a new Lattice checkpoint, or straight into registered pytrees).

Export writes ``{item: tree}`` with ``ocp.StandardCheckpointer`` at the given path, so
``ocp.StandardCheckpointer().restore(OUT)`` (or ``PyTreeCheckpointer``) reads it back: nested
dicts and lists mirroring each item's pytree (the nesting ``lattice.adapters.jax`` saves), with
a target pytree it restores to that pytree. An NNX item gets orbax's ``{"value": array}``
level per variable, so ``nnx.state(model)`` is a valid target. orbax cannot store strings,
bytes or zero-size arrays: those leaves are left out and reported.

Import reads a single orbax checkpoint directory or one step of a ``CheckpointManager``
directory (``<root>/<step>/<item>``), without a target; every top-level key becomes an item
(or the whole tree one item, with ``item=``).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ..core.errors import ConfigError
from . import write_checkpoint
from .arrays import read_checkpoint

log = logging.getLogger("lattice")
_SKIP = object()
_PRNG, _KEY_DATA = "__prng_key__", "key_data"  # lattice.adapters.jax_tree's typed-key form


def _for_orbax(x: Any, path: str, skipped: list[str]) -> Any:
    """A tree orbax's StandardCheckpointer can store; unsupported leaves become ``_SKIP``."""
    if isinstance(x, dict):
        if set(x) == {_PRNG, _KEY_DATA}:
            return jax.random.wrap_key_data(np.asarray(x[_KEY_DATA]), impl=x[_PRNG])
        out = {}
        for k, v in x.items():
            value = _for_orbax(v, f"{path}/{k}", skipped)
            if value is not _SKIP:
                out[str(k)] = value
        return out
    if isinstance(x, list | tuple):
        values = [_for_orbax(v, f"{path}/{i}", skipped) for i, v in enumerate(x)]
        return [None if v is _SKIP else v for v in values]  # keep the positions
    if isinstance(x, np.ndarray | np.generic):
        if np.size(x) == 0:
            skipped.append(f"{path} (zero-size array: orbax cannot save it)")
            return _SKIP
        return x
    if x is None or isinstance(x, bool | int | float):
        return x
    skipped.append(f"{path} ({type(x).__name__}: StandardCheckpointer cannot save it)")
    return _SKIP


def _nnx_values(x: Any) -> Any:
    """orbax's layout of ``nnx.state``: each variable's array under a ``value`` key."""
    if isinstance(x, dict) and set(x) != {_PRNG, _KEY_DATA}:
        return {k: _nnx_values(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nnx_values(v) for v in x]
    return {"value": x}


def export_orbax(directory: str | os.PathLike[str], out: str | os.PathLike[str], step: int | None = None,
                 *, internal: bool = False) -> list[str]:
    """Write checkpoint ``step`` (default: the newest) of ``directory`` as an orbax checkpoint at
    ``out`` (which must not exist). Returns the leaves left out, as ``item/path (why)``."""
    dest = Path(out).absolute()
    if dest.exists():
        raise ConfigError(f"{str(dest)!r} already exists; orbax export writes a new directory")
    ckpt = read_checkpoint(directory, step)
    skipped: list[str] = []
    tree = {}
    for name, item in ckpt.items.items():
        if name.startswith("_") and not internal:
            continue
        value = _nnx_values(item.tree) if item.adapter == "jax.nnx" else item.tree
        value = _for_orbax(value, name, skipped)
        if value is not _SKIP:
            tree[name] = value
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dest, tree)
        ckptr.wait_until_finished()
    for leaf in skipped:
        log.warning("orbax export: left out %s", leaf)
    return skipped


# -- reading orbax checkpoints -------------------------------------------------------------
_STEP_DIR = re.compile(r"^(?:.*_)?(\d+)$")


def _steps(root: Path) -> dict[int, Path]:
    out = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and "tmp" not in p.name:
            out[int(m.group(1))] = p
    return out


def _restore_dir(path: Path) -> Any:
    """One orbax pytree directory, without a target: saved shardings if they fit here, else numpy."""
    ckptr = ocp.PyTreeCheckpointer()
    try:
        with warnings.catch_warnings():  # reading the saved shardings is what we ask for here
            warnings.filterwarnings("ignore", message="Sharding info not provided")
            return ckptr.restore(path)
    except (ValueError, RuntimeError) as exc:  # e.g. saved on devices this host does not have
        log.info("orbax restore of %s with its saved shardings failed (%s); reading as numpy", path, exc)
        meta = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def read_orbax(src: str | os.PathLike[str], step: int | None = None) -> tuple[Any, int]:
    """Read an orbax checkpoint: a pytree directory, or step ``step`` (default: the newest) of a
    ``CheckpointManager`` root. Returns the tree and its step (``step`` or 0 for a single one)."""
    root = Path(src).absolute()
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not an orbax checkpoint directory")
    if (root / "_METADATA").exists():
        return _restore_dir(root), step or 0
    steps = _steps(root)
    if not steps:
        raise ConfigError(f"{str(root)!r} holds neither an orbax pytree (_METADATA) nor step directories")
    if step is None:
        step = max(steps)
    if step not in steps:
        raise ConfigError(f"no step {step} in {str(root)!r}; steps: {sorted(steps)}")
    path = steps[step]
    if (path / "_METADATA").exists():
        return _restore_dir(path), step
    items = {p.name: _restore_dir(p) for p in sorted(path.iterdir()) if (p / "_METADATA").exists()}
    if not items:
        raise ConfigError(f"{str(path)!r} has no orbax pytree items (directories with _METADATA)")
    return (items["default"] if list(items) == ["default"] else items), step


def _has_arrays(tree: Any) -> bool:
    return any(isinstance(x, jax.Array | np.ndarray) for x in jax.tree_util.tree_leaves(tree))


def _top_level(tree: Any, item: str | None) -> dict[str, Any]:
    if item is not None:
        return {item: tree}
    if not isinstance(tree, dict):
        raise ConfigError("the orbax checkpoint's top level is not a dict; name the item to hold it "
                          "(--item NAME / item=...)")
    return tree


def import_orbax(src: str | os.PathLike[str], directory: str | os.PathLike[str], step: int | None = None,
                 *, item: str | None = None) -> Path:
    """Write orbax checkpoint ``src`` as a Lattice checkpoint in ``directory``; return its path.

    Each top-level key becomes an item (``item``: the whole tree under that one name). Items
    holding arrays are written as ``jax.pytree`` items (register a pytree of that structure to
    restore them), others as plain values.
    """
    from ..adapters import BUILTINS
    from ..adapters.jax import PytreeAdapter
    from ..core.adapter import AdapterRegistry
    from ..core.arrays import CODECS

    class Imported:
        def __init__(self, tree: Any):
            self.tree = tree

    class ImportedAdapter(PytreeAdapter):  # writes the same "jax.pytree" items, numpy leaves kept
        priority = 1000

        def handles(self, obj: Any) -> bool:
            return isinstance(obj, Imported)

        def save(self, obj: Any) -> Any:
            return super().save(obj.tree)

    tree, found = read_orbax(src, step)
    objects = {k: Imported(v) if _has_arrays(v) else v for k, v in _top_level(tree, item).items()}
    registry = AdapterRegistry(BUILTINS, CODECS)
    registry.all()  # load the built-ins (and the jax codec) first: ours replaces "jax.pytree"
    registry.register(ImportedAdapter(), replace=True)
    return write_checkpoint(directory, registry, CODECS, objects, found)


def restore_orbax(src: str | os.PathLike[str], *, step: int | None = None, item: str | None = None,
                  session: Any = None) -> list[str]:
    """Restore an orbax checkpoint straight into registered JAX pytrees / NNX objects.

    Every registered item whose name is a top-level key of the orbax tree (or, with ``item``,
    that one item from the whole tree) is restored with the registered structure, dtypes and
    shardings; ``state.<name>`` then holds the restored value. Returns the names restored.
    """
    import lattice

    sess = session or lattice.session()
    tree, _ = read_orbax(src, step)
    top = _top_level(tree, item)
    done = []
    for name, it in sess.items.items():
        if name in top and it.adapter.name in ("jax.pytree", "jax.nnx"):
            it.obj = it.adapter.load(it.obj, top[name])
            done.append(name)
    if not done:
        registered = sorted(n for n in sess.items if not n.startswith("_"))
        raise ConfigError(f"no registered JAX item matches the orbax checkpoint's keys {sorted(map(str, top))[:10]} "
                          f"(registered: {registered}); register them first, or pass item=NAME")
    return done

