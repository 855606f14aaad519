"""Transparent mode: the patches to PyTorch that make an unmodified script checkpoint and resume.

``install()`` (run by ``import lattice.auto`` / ``python -m lattice.auto``) wraps four
constructors and adds one global hook; each only *records* objects, none changes what the
object does or draws from an RNG:

- ``Optimizer.__init__``, ``LRScheduler.__init__``, ``ReduceLROnPlateau.__init__`` and
  ``GradScaler.__init__`` remember the new object (a weak reference, numbered in order of
  construction);
- ``DataLoader.__init__`` makes the loader track its position (``DataLoaderAdapter.attach``)
  and hooks the start of each of its epochs (``iter(loader)``) and each batch request;
- ``DistributedSampler.__init__`` turns the sampler into a stand-in that, once a loader with a
  batch size uses it, delegates to an ``ElasticSampler`` with the same settings (the same
  indices while the world size stays; the rest of the epoch re-split when it changes);
- a global optimizer step post-hook (``register_optimizer_step_post_hook``) marks a step done.

Timing rule (docs/transparent.md): a step is counted, and a checkpoint taken when due, at
the next *boundary* of the loader that fed it: the next batch request or the next
``iter(loader)``, i.e. once the loop body (including ``sched.step()`` or logging after
``opt.step()``) has finished. Objects are registered ("frozen") at the first ``iter()`` of a
loader once an optimizer exists. On resume, that loader's first K-1 ``iter()`` calls (K: the
epoch the checkpoint was taken in) return empty iterators, while the script's code between
epochs runs on fresh objects; at the K-th call *everything* is restored (weights, optimizer,
schedulers, RNG, loader positions), so what that code did to captured state is overwritten,
and the epoch continues after its consumed batches.
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from ..core.errors import LatticeError
from .torch_data import DataLoaderAdapter
from .torch_elastic import ElasticSampler

log = logging.getLogger("lattice")
PREFIX = "[lattice.auto]"
_ORIGINALS: dict[type, Any] = {}
_HOOKS: list[Any] = []
CONTROLLER: Controller | None = None


def install(new_session: Callable[..., Any]) -> Controller:
    """Install the patches once (idempotent); returns the controller that will own the session.

    ``new_session(**options)`` makes the checkpoint session at the freeze (``lattice.new_session``).
    """
    global CONTROLLER
    if CONTROLLER is not None:
        return CONTROLLER
    ctl = Controller(new_session)
    for cls, kind in ((torch.optim.Optimizer, "optimizer"), (LRScheduler, "scheduler"),
                      (ReduceLROnPlateau, "scheduler"), (torch.amp.GradScaler, "scaler")):
        _wrap_init(cls, functools.partial(ctl.add, kind))
    _wrap_init(DataLoader, ctl.add_loader)
    _wrap_init(DistributedSampler, ctl.add_sampler)
    _HOOKS.append(register_optimizer_step_post_hook(ctl.after_step))
    CONTROLLER = ctl
    return ctl


def uninstall() -> None:
    """Undo ``install``: original constructors back, hook removed, tracked loaders unhooked."""
    global CONTROLLER
    for cls, original in _ORIGINALS.items():
        cls.__init__ = original  # type: ignore[misc]
    _ORIGINALS.clear()
    for handle in _HOOKS:
        handle.remove()
    _HOOKS.clear()
    if CONTROLLER is not None:
        CONTROLLER.disable()
    CONTROLLER = None


def installed() -> bool:
    return CONTROLLER is not None


def _wrap_init(cls: type, on_init: Any) -> None:
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        on_init(self)

    _ORIGINALS[cls] = original
    cls.__init__ = __init__  # type: ignore[misc]


_SAMPLERS: dict[type, type] = {}


def _elastic_class(cls: type) -> type:
    """A subclass of a ``DistributedSampler`` class that defers to ``self.elastic`` once it is set.

    Until a loader with a batch size adopts the sampler (``elastic`` is None) it is the
    original sampler; ``set_epoch`` always reaches both.
    """
    if cls not in _SAMPLERS:
        def __iter__(self: Any) -> Any:
            return iter(self.elastic) if self.elastic is not None else cls.__iter__(self)

        def __len__(self: Any) -> int:
            return len(self.elastic) if self.elastic is not None else cls.__len__(self)

        def set_epoch(self: Any, epoch: int) -> None:
            cls.set_epoch(self, epoch)
            if self.elastic is not None:
                self.elastic.set_epoch(epoch)

        ns = {"__module__": cls.__module__, "__iter__": __iter__, "__len__": __len__, "set_epoch": set_epoch,
              "lattice_elastic": property(lambda self: self.elastic is not None)}
        _SAMPLERS[cls] = type(f"LatticeElastic{cls.__name__}", (cls,), ns)
    return _SAMPLERS[cls]


def _say(msg: str) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


class Boundary:
    """The checkpoint's place in the loop: which loader fed the step and in which of its epochs."""

    def __init__(self) -> None:
        self.value: dict[str, int] = {}

    def state_dict(self) -> dict[str, int]:
        return dict(self.value)

    def load_state_dict(self, tree: dict[str, int]) -> None:
        self.value = dict(tree)


class LoaderHooks:
    """Called by a tracked loader (``_Position.auto``) at the start of an epoch and of a batch."""

    def __init__(self, ctl: Controller, index: int, pos: Any):
        self.ctl, self.index, self.pos = ctl, index, pos

    def before_next(self) -> None:
        ctl = self.ctl
        if ctl.pending and ctl.driver is self:
            ctl.boundary(self, starting=False)
        ctl.last = self

    def before_iter(self) -> Any:
        ctl = self.ctl
        if not ctl.frozen:
            if not ctl.has_optimizer():
                return None  # e.g. a pass over the data before the model exists: runs as usual
            ctl.freeze()
        if not ctl.enabled:
            return None
        if ctl.resume_at is not None:
            return ctl.fast_forward(self)
        if ctl.pending and ctl.driver is self:
            self.pos.exhausted = True  # the previous epoch is over for the script (left by break)
            ctl.boundary(self, starting=True)
        return None


class Controller:
    """Objects seen so far, the session once frozen, and the resume in progress."""

    def __init__(self, new_session: Callable[..., Any]) -> None:
        self.new_session = new_session
        self.enabled, self.frozen, self.pending = True, False, False
        self.seen: dict[str, list[weakref.ref[Any]]] = {"optimizer": [], "scheduler": [], "scaler": []}
        self.loaders: list[weakref.ref[Any]] = []
        self.known: weakref.WeakSet[Any] = weakref.WeakSet()
        self.last: LoaderHooks | None = None  # the loader that handed out the latest batch
        self.driver: LoaderHooks | None = None  # the loader that fed the step not yet counted
        self.record = Boundary()
        self.resume_at: tuple[int, int] | None = None  # (loader index, its epoch to restore at)
        self.session: Any = None
        self._warned: set[str] = set()

    # -- recording ------------------------------------------------------------------
    def add(self, kind: str, obj: Any) -> None:
        if not self.enabled or obj in self.known:
            return
        if self.frozen:
            self.warn_once(kind, f"a {kind} created after training started ({type(obj).__name__}) is not checkpointed")
            return
        self.known.add(obj)
        self.seen[kind].append(weakref.ref(obj))

    def add_loader(self, loader: Any) -> None:
        if not self.enabled or self.frozen or hasattr(loader, "_lattice_position"):
            return  # loaders made once training runs (e.g. per evaluation) are not tracked
        DataLoaderAdapter().attach(loader)
        loader._lattice_position.auto = LoaderHooks(self, len(self.loaders), loader._lattice_position)
        self.loaders.append(weakref.ref(loader))
        sampler = loader.sampler
        if type(sampler) in _SAMPLERS.values() and sampler.elastic is None and loader.batch_size:
            sampler.elastic = ElasticSampler(
                sampler.dataset, batch_size=loader.batch_size, shuffle=sampler.shuffle, seed=sampler.seed,
                drop_last=sampler.drop_last, rank=sampler.rank, world=sampler.num_replicas)
            sampler.elastic.set_epoch(sampler.epoch)

    def add_sampler(self, sampler: Any) -> None:
        if self.enabled and not self.frozen and type(sampler) not in _SAMPLERS.values():
            sampler.__class__ = _elastic_class(type(sampler))
            sampler.elastic = None

    def has_optimizer(self) -> bool:
        return any(r() is not None for r in self.seen["optimizer"])

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _say(f"warning: {msg}")

    # -- steps and boundaries -------------------------------------------------------
    def after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.enabled or optimizer not in self.known:
            return
        if not self.frozen:
            self.frozen = True
            self.disable("the first optimizer step came before any DataLoader iteration: transparent "
                         "mode needs the optimizer to exist before the training loop's first "
                         "`for batch in loader`; nothing is checkpointed")
            return
        if self.resume_at is not None:
            return  # a step in code between skipped epochs: state is restored later anyway
        if self.last is None:
            self.warn_once("noloader", "optimizer steps not fed by a DataLoader created before the "
                                       "loop are not counted or checkpointed")
            return
        self.pending, self.driver = True, self.last

    def boundary(self, hooks: LoaderHooks, *, starting: bool) -> None:
        """Count the step; checkpoint if due: the loop body that made it has finished."""
        self.pending = False
        self.record.value = {"loader": hooks.index, "iteration": hooks.pos.epoch + int(starting)}
        self.session.step_done()

    def fast_forward(self, hooks: LoaderHooks) -> Any:
        """During a resume: empty epochs until the checkpoint's, then restore everything."""
        index, target = self.resume_at  # type: ignore[misc]
        if hooks.index != index:
            return None
        if hooks.pos.epoch + 1 < target:
            hooks.pos.epoch += 1
            return iter(())
        self.resume_at = None
        self.session.restore_now([n for n in self.session.items if n != "auto"])
        return None

    # -- freezing and restoring ---------------------------------------------------
    def freeze(self) -> None:
        """Register what was recorded, in a session of its own, and read where to resume."""
        self.frozen = True
        objects = self._objects()
        self.session = self.new_session(restore=False)
        self.session.register(objects)
        atexit.register(self.close)
        cfg = self.session.config
        names = ", ".join(n for n in objects if n != "auto")
        policy = [f"every {cfg.every_steps} steps"] if cfg.every_steps else []
        policy += [f"every {cfg.every_seconds:g} s"] if cfg.every_seconds else []
        _say(f"checkpointing {names} to {cfg.checkpoint_dir} "
             f"{' and '.join(policy) or 'on request only (no step or time policy)'}")
        restored = self.session.restore_now(["auto"])
        if restored is not None:
            self._plan_resume(restored)

    def _plan_resume(self, restored: Any) -> None:
        rec = self.record.value
        if "loader" not in rec:
            raise LatticeError(f"{restored.path} was not written by transparent mode (no 'auto' record); "
                               "use another checkpoint_dir or the script's own lattice.register")
        ref = self.loaders[rec["loader"]] if rec["loader"] < len(self.loaders) else None
        loader = ref() if ref is not None else None
        if loader is None or loader._lattice_position.epoch >= rec["iteration"]:
            raise LatticeError(f"cannot resume from {restored.path}: its loader{rec['loader']} is not "
                               "there, or its epoch already started (create the loaders and optimizers "
                               "before the training loop, the same way in every run)")
        self.resume_at = (rec["loader"], rec["iteration"])
        for ref in self.seen["optimizer"]:  # else torch warns of `sched.step()` before `opt.step()`
            if ref() is not None:           # in the skipped epochs (its flag only feeds that warning)
                ref()._opt_called = True
        done = rec["iteration"] - 1 - loader._lattice_position.epoch
        _say(f"resuming at step {restored.step} from {restored.path}: loader{rec['loader']} skips "
             f"{done} completed epoch(s) without loading data, then restores and continues epoch {rec['iteration']}")

    def _objects(self) -> dict[str, Any]:
        live = {k: [o for o in (r() for r in refs) if o is not None] for k, refs in self.seen.items()}
        modules, loose, untrained = trained_modules(live["optimizer"])
        objects: dict[str, Any] = {"auto": self.record}
        for i, ref in enumerate(self.loaders):
            if ref() is not None:
                objects[f"loader{i}"] = ref()
        for kind, objs in (("optimizer", live["optimizer"]), ("module", modules), ("tensor", loose),
                           ("scheduler", live["scheduler"]), ("scaler", live["scaler"])):
            objects.update({f"{kind}{i}": o for i, o in enumerate(objs)})
        notes = []
        if loose:
            notes.append(f"{len(loose)} trained tensor(s) belong to no module: saved as bare tensors "
                         "by their place in the optimizer")
        if untrained:
            kinds = ", ".join(sorted({type(m).__name__ for m in untrained}))
            notes.append(f"module(s) with parameters or buffers that no optimizer trains ({kinds}) are "
                         "not checkpointed: fine if they do not change")
        if notes:
            self.warn_once("capture", "; ".join(notes))
        return objects

    def disable(self, why: str | None = None) -> None:
        if why:
            self.warn_once("disabled", why)
        self.enabled, self.pending = False, False
        for ref in self.loaders:
            loader = ref()
            if loader is not None:
                loader._lattice_position.auto = None

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def trained_modules(optimizers: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """The outermost live modules holding the optimizers' parameters (in parameter order), the
    trained tensors no module holds, and outermost modules with state that no optimizer trains."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    wanted = {id(p) for p in params}
    gc.collect()  # a module dropped in a reference cycle would otherwise come and go between runs
    mods = [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Module)]  # not isinstance: no __class__ lookups
    inner = {id(c) for m in mods for c in m.children()}
    owners: dict[int, list[Any]] = {}
    untrained = []
    for root in (m for m in mods if id(m) not in inner):
        own = {id(p) for p in root.parameters()}
        for pid in own & wanted:
            owners.setdefault(pid, []).append(root)
        if not own & wanted and (own or next(root.buffers(), None) is not None):
            untrained.append(root)
    modules: list[Any] = []
    loose: list[Any] = []
    for p in params:
        found = owners.get(id(p))
        if not found:
            if all(q is not p for q in loose):
                loose.append(p)
        modules.extend(m for m in found or () if all(m is not k for k in modules))
    return modules, loose, untrained
