"""Elastic data parallelism: a sampler whose epoch position is global, so it survives a world-size change.

``ElasticSampler`` hands out the same indices as ``torch``'s ``DistributedSampler`` with the
same ``(num_replicas, rank, shuffle, seed, drop_last)`` as long as the world size does not
change (the epoch's permutation is ``randperm(n)`` seeded with ``seed + epoch``, padded by
repeating its head to a multiple of ``W``, or cut to one with ``drop_last``; rank ``r`` takes
positions ``r, r+W, r+2W, ...``). It also records how many samples of the epoch the whole job
consumed (``consumed``): in whole steps, step ``k`` of a pass covers positions
``[k*W*b, (k+1)*W*b)`` of the remainder, so after ``k`` steps ``consumed = start + k*W*b``
(at most the remainder) on every rank. The state (epoch, consumed) is replicated: rank 0
writes it once. A job restarted with ``W'`` ranks splits the rest of the epoch afresh
(padded for ``W'``), so every sample of an epoch is consumed exactly once across world-size
changes, except the up to ``W-1`` padding repeats of a pass's last step that
``DistributedSampler`` also makes.

Consumption is counted in whole steps. Driven by a ``DataLoader`` that Lattice tracks (a
registered loader, or any loader in transparent mode) it counts the batches the loader *handed
to the training loop*, so batches that worker processes prefetched are not counted: exact with
any ``num_workers``. Iterated directly (or by an untracked loader) it counts the indices it
handed out, which is exact with ``num_workers=0``.

Global batch policy: the sampler remembers the job's global batch (``world * batch_size`` when
it first ran). Restored with a different world size, it keeps that global batch by default
(``batch_size = global // world``) where the per-rank batch allows it (it divides evenly and
is at most ``max_batch``); otherwise it logs a warning and uses the nearest per-rank batch
that fits. A tracked loader follows the sampler's batch size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from ..core.adapter import Adapter
from ..core.ranks import Ranks

log = logging.getLogger("lattice")


class ElasticSampler(Sampler[int]):
    """Data-parallel sampler with a global, checkpointed position in the epoch (see the module doc).

    ``rank``/``world`` default to ``RANK``/``WORLD_SIZE``. Call ``set_epoch(e)`` before each
    epoch like ``DistributedSampler``; setting the epoch it is already in keeps its position
    (so a resumed ``for epoch in range(start, n): sampler.set_epoch(epoch)`` continues).
    ``batch_size`` is this rank's batch and must match the loader's (a tracked loader follows
    it); it may be changed between steps (e.g. by an ``on_resize`` hook): ``consumed`` counts
    samples. ``keep_global_batch`` / ``max_batch`` (default ``LATTICE_MAX_RANK_BATCH``) set the
    resize policy of the module doc.
    """

    lattice_elastic = True  # the DataLoader adapter leaves positioning to this sampler

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world: int | None = None,
                 keep_global_batch: bool = True, max_batch: int | None = None):
        self.n = dataset if isinstance(dataset, int) else len(dataset)
        env = Ranks.from_env()
        self.rank = env.rank if rank is None else rank
        self.world = env.world if world is None else world
        if batch_size < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"batch_size={batch_size}, rank={self.rank}, world={self.world}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by the whole job (before the current pass)
        self.exhausted = False  # the pass over this epoch ran to its end
        self._start = 0  # ``consumed`` when the current pass began
        self._given = 0  # indices this rank handed out in the current pass
        self.global_batch: int | None = None  # the job's global batch, fixed when it first runs
        self.keep_global_batch = keep_global_batch
        env_max = os.environ.get("LATTICE_MAX_RANK_BATCH")
        self.max_batch = max_batch if max_batch is not None else (int(env_max) if env_max else None)
        self.driven_by_loader = False  # a tracked DataLoader reports the batches it delivered

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed, self.exhausted = epoch, 0, False

    def permutation(self) -> list[int]:
        """The epoch's order, the same on every rank (``DistributedSampler``'s)."""
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def _span(self, start: int) -> int:
        """Positions the current world takes from ``start``: the rest, padded or cut to a multiple of W."""
        rest = self.n - start
        return rest // self.world * self.world if self.drop_last else math.ceil(rest / self.world) * self.world

    def indices(self, start: int) -> list[int]:
        """This rank's indices of the epoch's remainder from global position ``start``, in order."""
        rest = self.permutation()[start:]
        span = self._span(start)
        if span > len(rest):  # pad by repeating the head, as DistributedSampler does
            rest = (rest * math.ceil(span / len(rest)))[:span]
        return rest[self.rank:span:self.world]

    def _after(self, steps: int) -> int:
        """``consumed`` once ``steps`` steps of this pass are done."""
        span = min(self._span(self._start), self.n - self._start)
        return self._start + min(steps * self.world * self.batch_size, span)

    def __iter__(self) -> Iterator[int]:
        if self.exhausted:  # a new pass without set_epoch: the same epoch again, from its start
            self.consumed, self.exhausted = 0, False
        if self.global_batch is None:
            self.global_batch = self.world * self.batch_size
        self._start, self._given = self.consumed, 0
        return self._run(self.indices(self._start))

    def _run(self, mine: list[int]) -> Iterator[int]:
        for i in mine:
            self._given += 1
            if not self.driven_by_loader:
                self.consumed = self._after(math.ceil(self._given / self.batch_size))
            yield i
        if not self.driven_by_loader:
            self.consumed, self.exhausted = self._after(math.ceil(self._given / self.batch_size)), True

    def delivered(self, batches: int) -> None:
        """A tracked loader handed its ``batches``-th batch of this pass to the training loop."""
        self.consumed = self._after(batches)

    def pass_done(self, batches: int) -> None:
        """A tracked loader's pass ran to its end after ``batches`` batches."""
        self.consumed, self.exhausted = self._after(batches), True

    def __len__(self) -> int:
        """This rank's samples left in the epoch (all of it when the last pass ran to its end)."""
        return self._span(0 if self.exhausted else self.consumed) // self.world

    @staticmethod
    def per_rank_batch(global_batch: int, world: int, max_batch: int | None = None) -> int:
        """The default resize policy: keep ``global_batch`` constant where the per-rank batch allows.

        Returns ``global_batch // world`` when it divides evenly and fits ``max_batch``;
        otherwise logs a warning and returns the nearest per-rank batch that does fit (at least 1),
        so the global batch changes.
        """
        per = max(1, global_batch // world)
        if max_batch is not None and per > max_batch:
            per = max_batch
        if per * world != global_batch:
            log.warning("global batch %d cannot be kept with %d ranks%s: using %d per rank (global %d)",
                        global_batch, world, f" and at most {max_batch} per rank" if max_batch else "",
                        per, per * world)
        return per

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the same on every rank)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "exhausted": self.exhausted, "n": self.n,
                "world": self.world, "batch_size": self.batch_size, "global_batch": self.global_batch}

    def load_state(self, tree: dict[str, Any]) -> None:
        """Continue from ``tree``; apply the global batch policy if the world size changed."""
        if tree["n"] != self.n:
            log.warning("ElasticSampler: the checkpoint's dataset had %d samples, this one %d", tree["n"], self.n)
        self.epoch, self.consumed, self.exhausted = tree["epoch"], min(tree["consumed"], self.n), tree["exhausted"]
        self._start, self._given = self.consumed, 0
        self.global_batch = tree.get("global_batch") or self.global_batch
        old_world = tree.get("world", self.world)
        if not (self.keep_global_batch and self.global_batch):
            return
        before = self.batch_size
        if old_world == self.world:  # the same world: the batch it ran with (set by the policy, maybe)
            self.batch_size = tree.get("batch_size", self.batch_size)
        else:
            self.batch_size = self.per_rank_batch(self.global_batch, self.world, self.max_batch)
        if self.batch_size != before:
            log.info("ElasticSampler: world %d -> %d, per-rank batch %d -> %d (global batch %d)",
                     old_world, self.world, before, self.batch_size, self.batch_size * self.world)


class ElasticSamplerAdapter(Adapter):
    """``ElasticSampler``: epoch and global consumption, replicated (the same on every rank)."""

    name = "lattice.elastic_sampler"
    per_rank = False
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, ElasticSampler)

    def save(self, obj: ElasticSampler) -> Any:
        return obj.state()

    def load(self, obj: ElasticSampler, tree: Any) -> Any:
        obj.load_state(tree)
        return obj
