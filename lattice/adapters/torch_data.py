"""Where a ``DataLoader`` is in its epoch, and how to resume there without loading the skipped data.

Registering a loader swaps its class for a tracking subclass (the object, its workers and
its settings are untouched). The subclass counts the batches handed out in the current
epoch and records the RNG states the loader's randomness is drawn from: the state at
iterator creation (worker base seed) and the state when the sampler starts (shuffle
order). On resume, the next ``iter(loader)`` replays both draws from the saved states, so
the epoch has the same order, then skips the consumed batches at the index level: for
map-style datasets the skipped samples are never loaded. The global RNG is left exactly as
restored, so training after the resume draws the same numbers as an uninterrupted run.

Transparent mode (``torch_auto``) hooks each ``iter(loader)`` and each batch request through
``_Position.auto``.

Limits: an ``IterableDataset`` cannot skip by index, so its consumed batches are read and
dropped (logged once); with ``num_workers > 0`` randomness inside the workers (random
augmentation) follows the worker seeds, which restart with the epoch's iterator.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..core.adapter import Adapter

log = logging.getLogger("lattice")


def _rng(loader: DataLoader) -> dict[str, Any]:
    gen = loader.generator
    return {"cpu": torch.get_rng_state(), "gen": gen.get_state() if gen is not None else None}


def _set_rng(loader: DataLoader, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("gen") is not None and loader.generator is not None:
        loader.generator.set_state(state["gen"])


class _Position:
    def __init__(self) -> None:
        self.epoch = 0  # iterations started
        self.batches = 0  # batches handed out in the current epoch
        self.exhausted = False  # the epoch's iterator has raised StopIteration
        self.base_rng: dict[str, Any] | None = None
        self.sampler_rng: dict[str, Any] | None = None
        self.resume: dict[str, Any] | None = None
        self.wrapper: _IndexSampler | None = None
        self.auto: Any = None  # transparent mode's hooks (torch_auto.LoaderHooks), else None


class _IndexSampler:
    """Wraps the loader's index sampler; on resume replays its first draw and skips batches."""

    def __init__(self, inner: Any, loader: DataLoader):
        self.inner, self.loader = inner, loader

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Any:
        return self._run()

    def _run(self) -> Any:
        pos: _Position = self.loader._lattice_position
        resume, pos.resume = pos.resume, None
        if resume is None:
            pos.sampler_rng = _rng(self.loader)
            yield from self.inner
            return
        current = _rng(self.loader)
        _set_rng(self.loader, resume["sampler_rng"])
        it = iter(self.inner)
        first = list(itertools.islice(it, 1))  # starts the sampler: its seed draw happens now
        replay = _rng(self.loader)
        _set_rng(self.loader, current)
        pos.sampler_rng = resume["sampler_rng"]
        rest = it if self.loader.generator is None else self._on_replayed_generator(it, replay["gen"])
        yield from itertools.islice(itertools.chain(first, rest), resume["batches"], None)

    def _on_replayed_generator(self, it: Any, state: Any) -> Any:
        """The rest of a replayed epoch whose sampler draws from the loader's ``generator``.

        Such a sampler may draw again later in the epoch (``RandomSampler`` does when it runs
        out, and workers make it run ahead of the batches handed out): those draws continue the
        replayed timeline, and once the sampler is done the generator is left where an
        uninterrupted epoch leaves it.
        """
        gen = self.loader.generator
        while True:
            live = gen.get_state()
            gen.set_state(state)
            try:
                item = next(it)
            except StopIteration:
                return  # the generator stays on the replayed timeline, as after an uninterrupted epoch
            state = gen.get_state()
            gen.set_state(live)
            yield item


class _Counting:
    """The loader's iterator, counting the batches it hands out (and telling an elastic sampler)."""

    def __init__(self, it: Any, pos: _Position, elastic: Any = None):
        self._it, self._pos, self._elastic = it, pos, elastic

    def __iter__(self) -> _Counting:
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self) -> Any:
        if self._pos.auto is not None:
            self._pos.auto.before_next()
        try:
            batch = next(self._it)
        except StopIteration:
            self._pos.exhausted = True
            if self._elastic is not None:
                self._elastic.pass_done(self._pos.batches)
            raise
        self._pos.batches += 1
        if self._elastic is not None:
            self._elastic.delivered(self._pos.batches)
        return batch


def _index_sampler(self: Any, base: type) -> Any:
    inner = base._index_sampler.fget(self)  # type: ignore[attr-defined]
    pos = self._lattice_position
    if pos.wrapper is None or pos.wrapper.inner is not inner:
        pos.wrapper = _IndexSampler(inner, self)
    return pos.wrapper


def _iter(self: Any, base: type) -> Any:
    pos: _Position = self._lattice_position
    if pos.auto is not None:
        skipped = pos.auto.before_iter()
        if skipped is not None:
            return skipped
    resume = pos.resume
    elastic = _elastic(self)
    if resume is None:
        pos.base_rng, pos.epoch, pos.batches, pos.exhausted = _rng(self), pos.epoch + 1, 0, False
        return _Counting(base.__iter__(self), pos, elastic)
    current = _rng(self)
    _set_rng(self, resume["base_rng"])
    it = base.__iter__(self)
    iterable = isinstance(self.dataset, IterableDataset)
    if iterable:  # no index-level skipping: read the consumed batches and drop them
        pos.resume = None
        log.info("resuming an IterableDataset loader: reading and dropping %d batches", resume["batches"])
        for _ in range(resume["batches"]):
            next(it, None)
    _set_rng(self, current)
    pos.base_rng, pos.epoch, pos.batches = resume["base_rng"], resume["epoch"], resume["batches"]
    pos.exhausted = False
    if iterable:
        pos.sampler_rng = resume["sampler_rng"]
    return _Counting(it, pos, elastic)


def elastic_sampler(loader: Any) -> Any:
    """The ``ElasticSampler`` that positions ``loader`` (behind transparent mode's
    ``DistributedSampler`` stand-in, if so), or None."""
    sampler = getattr(loader, "sampler", None)
    if not getattr(sampler, "lattice_elastic", False):
        return None
    return getattr(sampler, "elastic", sampler)


def _elastic(loader: Any) -> Any:
    """The loader's elastic sampler, now driven by this loader's delivered batches, or None.

    The loader's ``BatchSampler`` follows the sampler's batch size (the resize policy may
    have changed it); ``loader.batch_size`` itself is read-only after construction.
    """
    sampler = elastic_sampler(loader)
    if sampler is None or loader.batch_sampler is None:
        return None
    sampler.driven_by_loader = True
    if hasattr(loader.batch_sampler, "batch_size") and loader.batch_sampler.batch_size != sampler.batch_size:
        loader.batch_sampler.batch_size = sampler.batch_size
    return sampler


_CLASSES: dict[type, type] = {}


def _tracked_class(cls: type) -> type:
    """A subclass of the loader's own class with counting ``__iter__`` and wrapped index sampler.

    The methods call ``cls``'s explicitly (no mixin in the MRO), so the object layout is
    unchanged and ``__class__`` assignment is allowed.
    """
    if cls not in _CLASSES:
        ns = {"__module__": cls.__module__, "__slots__": (),
              "_index_sampler": property(lambda self: _index_sampler(self, cls)),
              "__iter__": lambda self: _iter(self, cls)}
        _CLASSES[cls] = type(f"Lattice{cls.__name__}", (cls,), ns)
    return _CLASSES[cls]


class DataLoaderAdapter(Adapter):
    """``torch.utils.data.DataLoader``: epoch, batches consumed, and the RNG states of the epoch."""

    name = "torch.dataloader"
    per_rank = True  # each rank has its own
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, DataLoader)

    def attach(self, obj: Any) -> Any:
        if type(obj) not in _CLASSES.values():
            obj.__class__ = _tracked_class(type(obj))
            obj._lattice_position = _Position()
        return obj

    def save(self, obj: Any) -> Any:
        pos: _Position = obj._lattice_position
        # the loader's own generator is nobody else's to capture (the global RNG is torch.rng's)
        gen = obj.generator.get_state() if obj.generator is not None else None
        if pos.resume is not None:  # restored but not iterated yet: keep the restored position
            return {**pos.resume, "generator": gen}
        return {"epoch": pos.epoch, "batches": pos.batches, "exhausted": pos.exhausted,
                "base_rng": pos.base_rng, "sampler_rng": pos.sampler_rng, "generator": gen}

    def load(self, obj: Any, tree: Any) -> Any:
        """Resume inside the saved epoch unless its iterator had run out.

        A checkpoint taken at the last batch of an epoch (inside the ``for`` loop) resumes
        with an empty remainder, so the code after the loop runs once, as it would have;
        one taken after the loop ended starts the next epoch.
        """
        pos: _Position = self.attach(obj)._lattice_position
        pos.epoch, pos.batches, pos.exhausted = tree["epoch"], tree["batches"], tree["exhausted"]
        pos.base_rng, pos.sampler_rng = tree["base_rng"], tree["sampler_rng"]
        if tree.get("generator") is not None and obj.generator is not None:
            obj.generator.set_state(tree["generator"])  # where an uninterrupted run's would be now
        fresh = tree["base_rng"] is None or tree["sampler_rng"] is None or tree["exhausted"]
        if elastic_sampler(obj) is not None and not fresh:
            pos.epoch -= 1  # an ElasticSampler positions itself: the next iter() re-enters this epoch
            fresh = True
        pos.resume = None if fresh else dict(tree)
        return obj

    def companions(self, obj: Any) -> dict[str, Any]:
        """An elastic sampler is registered with its loader, as ``<loader>_sampler``: its state is
        the same on every rank (replicated), while the loader's own is per rank."""
        sampler = elastic_sampler(obj)
        return {"sampler": sampler} if sampler is not None else {}
