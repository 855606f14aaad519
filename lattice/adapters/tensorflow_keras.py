"""Keras 3 adapters (TensorFlow backend): models and layers, optimizers, single Keras variables.

Keras names variables after layers (``dense_1/kernel``) with process-wide counters, so a
restarted program may name the same variable differently; like Keras's own weight files,
the state is matched by position (``model.variables`` order), and the paths are recorded
only to make a mismatch readable. Keras optimizers create their slot variables lazily on the
first step: a checkpoint restored before that is kept and assigned right after the build.
This module never imports keras itself; it looks at ``sys.modules``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..core.adapter import Adapter
from ..core.errors import StateMismatchError

log = logging.getLogger("lattice")
_PENDING = "_lattice_pending_state"


def _keras(attr: str) -> Any:
    """``keras.<attr>`` if keras 3 is imported, else ``None``."""
    k = sys.modules.get("keras")
    obj = k
    for part in attr.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj


def is_keras_variable(x: Any) -> bool:
    cls = _keras("Variable")
    return cls is not None and isinstance(x, cls)


def _paths(variables: list[Any]) -> list[str]:
    return [str(getattr(v, "path", getattr(v, "name", ""))) for v in variables]


def _assign_all(live: list[Any], values: list[Any], where: str) -> None:
    from .tensorflow import assign

    for i, (var, value) in enumerate(zip(live, values, strict=True)):
        assign(var, value, f"{where} variable {i} ({_paths([var])[0]})")


def _note_renames(saved: list[str], live: list[str], where: str) -> None:
    renamed = [(a, b) for a, b in zip(saved, live, strict=False) if a != b]
    if renamed:
        log.debug("%s: %d variables have other names than when saved (matched by position), e.g. %s -> %s",
                  where, len(renamed), *renamed[0])


class KerasModelAdapter(Adapter):
    """A Keras 3 ``Model`` or ``Layer``: every variable in ``.variables`` (weights, non-trainable
    state such as batch-norm statistics, and seed-generator states), by position."""

    name = "keras.model"
    priority = 110

    def handles(self, obj: Any) -> bool:
        cls = _keras("Layer")
        return cls is not None and isinstance(obj, cls)

    def save(self, obj: Any) -> Any:
        variables = list(obj.variables)
        return {"variables": variables, "paths": _paths(variables)}

    def load(self, obj: Any, tree: Any) -> Any:
        live, values = list(obj.variables), list(tree["variables"])
        where = f"Keras {type(obj).__name__} {obj.name!r}"
        if len(live) != len(values):
            hint = " It has no variables yet: build it first (model.build(shape), or call it on a " \
                   "batch) and register it after." if not live else ""
            raise StateMismatchError(f"{where} has {len(live)} variables, the checkpoint has {len(values)}."
                                     f"{hint} Register the same architecture that was saved.")
        _note_renames(list(tree.get("paths", [])), _paths(live), where)
        _assign_all(live, values, where)
        return obj


class KerasOptimizerAdapter(Adapter):
    """A Keras 3 optimizer: iteration count, learning rate variable and slot variables
    (e.g. Adam's moments), by position. Restore works before the first step too: the slot
    values wait until Keras builds the optimizer, then are assigned at once."""

    name = "keras.optimizer"
    priority = 110

    def handles(self, obj: Any) -> bool:
        cls = _keras("optimizers.Optimizer")
        return cls is not None and isinstance(obj, cls)

    def save(self, obj: Any) -> Any:
        variables: list[Any] = list(obj.variables)
        pending = obj.__dict__.get(_PENDING)
        if pending is not None and not obj.built:  # restored, not yet built: keep what is waiting
            variables = variables + pending["values"]
            return {"variables": variables, "paths": _paths(variables[:-len(pending["values"])]) + pending["paths"]}
        return {"variables": variables, "paths": _paths(variables)}

    def load(self, obj: Any, tree: Any) -> Any:
        live, values = list(obj.variables), list(tree["variables"])
        paths = [str(p) for p in tree.get("paths", [""] * len(values))]
        where = f"Keras optimizer {obj.name!r}"
        if len(live) == len(values):
            _note_renames(paths, _paths(live), where)
            _assign_all(live, values, where)
            return obj
        if not obj.built and len(values) > len(live):
            _assign_all(live, values[:len(live)], where)  # iteration count, learning rate
            self._defer(obj, values[len(live):], paths[len(live):], len(live))
            return obj
        raise StateMismatchError(
            f"{where} has {len(live)} variables, the checkpoint has {len(values)}: register the "
            "optimizer with the same model and settings (e.g. the same use_ema / gradient_accumulation_steps)")

    def _defer(self, opt: Any, values: list[Any], paths: list[str], start: int) -> None:
        """Assign the slot values once Keras builds the optimizer (on its first step)."""
        build = type(opt).build

        def build_then_restore(variables: Any) -> None:
            build(opt, variables)
            pending = opt.__dict__.pop(_PENDING, None)
            opt.__dict__.pop("build", None)
            if pending is None:
                return
            live = list(opt.variables)[start:]
            if len(live) != len(pending["values"]):
                raise StateMismatchError(
                    f"Keras optimizer {opt.name!r} built {len(live)} slot variables for these model "
                    f"variables, the checkpoint has {len(pending['values'])}: apply it to the same model")
            _assign_all(live, pending["values"], f"Keras optimizer {opt.name!r}")

        object.__setattr__(opt, _PENDING, {"values": values, "paths": paths})
        object.__setattr__(opt, "build", build_then_restore)
        log.info("Keras optimizer %r is not built yet: its %d slot variables are restored at its first step",
                 opt.name, len(values))


ADAPTERS = [KerasModelAdapter, KerasOptimizerAdapter]
