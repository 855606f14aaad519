"""Lattice: elastic, fault-tolerant training without checkpoint or restart code.

    import lattice
    state = lattice.register(model=model, optimizer=opt, epoch=0)   # restores if it can
    for batch in loader:
        ...
        lattice.step()                                               # checkpoints by policy

Everything public is re-exported here; the modules below are internal.
"""

from __future__ import annotations

import atexit
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .adapters import BUILTINS as _BUILTINS
from .adapters.python import PythonRNG as _PythonRNG
from .core import config as _config
from .core.adapter import Adapter, AdapterRegistry
from .core.arrays import CODECS as _CODECS
from .core.arrays import ArrayCodec
from .core.config import Config
from .core.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    LatticeError,
    PluginError,
    StateMismatchError,
    UnsupportedObjectError,
)
from .core.session import Session
from .core.state import State
from .interop.arrays import load_arrays  # numpy and lattice.core only

__version__ = "0.1.0"
__all__ = [
    "Adapter", "ArrayCodec", "CheckpointError", "Config", "ConfigError", "CorruptCheckpointError",
    "ElasticSampler", "LatticeError", "PluginError", "Session", "State", "StateMismatchError", "UnsupportedObjectError",
    "adapter_errors", "adapters", "checkpoint", "close", "configure", "new_session", "on_resize", "register",
    "register_adapter", "session", "step", "wait",
    "load_arrays",
]

ADAPTERS = AdapterRegistry(_BUILTINS, _CODECS)
_lock = threading.RLock()
_options: dict[str, Any] = {}
_session: Session | None = None


def configure(**options: Any) -> Config:
    """Set checkpoint options (``checkpoint_dir``, ``every_steps``, ``every_seconds``, ``keep``, ...).

    Arguments override the ``LATTICE_*`` environment variables. Policy options may change
    at any time; ``checkpoint_dir`` only before the first ``register``.
    """
    global _session
    with _lock:
        cfg = _config.from_env().replace(**{**_options, **options})
        if _session is not None:
            if str(cfg.checkpoint_dir) != str(_session.config.checkpoint_dir):
                raise ConfigError("checkpoint_dir cannot change after lattice.register(); call configure() first")
            _session.config = cfg
            _session._persister.keep = cfg.keep
        _options.update(options)
        return cfg


def _internal_items() -> dict[str, Any]:
    items: dict[str, Any] = {"__rng__": _PythonRNG()}
    import sys

    if "torch" in sys.modules:
        from .adapters.torch import TorchRNG

        items["__torch_rng__"] = TorchRNG()
    return items


def new_session(**options: Any) -> Session:
    """A separate ``Session`` (own directory and items) with options over the environment's."""
    cfg = _config.from_env().replace(**options)
    return Session(cfg, ADAPTERS, _CODECS, internal=_internal_items())


def session() -> Session:
    """The process-wide session behind ``register``/``step``/``checkpoint``, created on first use."""
    global _session
    with _lock:
        if _session is None:
            _session = new_session(**_options)
        return _session


def register(**objects: Any) -> State:
    """Register objects by name and restore the newest good checkpoint into them, in place.

    Accepts ``nn.Module``s, optimizers, schedulers, ``GradScaler``, ``DataLoader``s, any object
    with ``state_dict``/``load_state_dict``, numpy arrays, plain Python values, and whatever an
    adapter handles. Returns the ``State`` handle (``state.step``, ``state.<name>``).
    """
    return session().register(objects)


def step() -> None:
    """One training step is done; checkpoint if the policy (every N steps / T seconds) says so."""
    session().step_done()


def checkpoint() -> Future[Path] | None:
    """Checkpoint now: blocks only for the snapshot copy; persists in the background."""
    return session().checkpoint()


def wait(timeout: float | None = None) -> Path | None:
    """Block until the last checkpoint is committed; return its directory (raise if it failed)."""
    return _session.wait(timeout) if _session is not None else None


def close() -> None:
    """Wait for the in-flight checkpoint and forget the process-wide session (runs at exit)."""
    global _session
    with _lock:
        if _session is not None:
            _session.close()
        _session = None
        _options.clear()


def on_resize(fn: Any) -> Any:
    """Call ``fn(old_world, new_world)`` once when the restored checkpoint was written by a different
    number of ranks (at restore, or now if the restore already happened). Usable as a decorator.

    Use it to rescale the learning rate or gradient accumulation; the default policy is to keep
    the global batch constant: ``ElasticSampler.per_rank_batch(global_batch, new_world)``.
    """
    return session().on_resize(fn)


def __getattr__(name: str) -> Any:
    if name == "ElasticSampler":  # imports torch: only on use
        from .adapters.torch_elastic import ElasticSampler

        return ElasticSampler
    if name == "keras":  # lattice.keras.Checkpoint imports keras: only on use
        import importlib

        return importlib.import_module(".keras", __name__)
    raise AttributeError(f"module 'lattice' has no attribute {name!r}")


def register_adapter(adapter: Any, *, replace: bool = False) -> Any:
    """Add an adapter class or instance (also usable as a class decorator)."""
    return ADAPTERS.register(adapter, replace=replace)


def adapters() -> list[Any]:
    """Every adapter known now (built-ins for imported frameworks, plugins, your own), in resolution order."""
    return ADAPTERS.all()


def adapter_errors() -> list[str]:
    """Messages of adapter plugins that failed to load (also logged and warned at load time)."""
    ADAPTERS.all()
    return [msg for _, msg in ADAPTERS.errors]


atexit.register(close)


def _auto_from_env() -> None:
    """``LATTICE_AUTO=1``: importing lattice also installs transparent mode (``lattice.auto``)."""
    import os

    if os.environ.get("LATTICE_AUTO", "").strip().lower() in ("1", "true", "yes", "on"):
        from . import auto  # noqa: F401  (installs the patches on import)


_auto_from_env()
