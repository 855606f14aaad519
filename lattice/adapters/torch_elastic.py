"""Elastic data parallelism: a sampler whose epoch position is global, so it survives a world-size change.

``ElasticSampler`` fixes each epoch's permutation by ``(seed, epoch)`` (a ``torch.Generator``,
the same on every rank) and records how many samples of the epoch the whole job consumed
(``consumed``). Rank ``r`` of world ``W`` takes, from the not-yet-consumed remainder of the
permutation, the samples at positions ``r, r+W, r+2W, ...`` in whole batches: step ``k`` of
the job consumes remainder positions ``[k*W*b, (k+1)*W*b)``, so after ``k`` steps
``consumed = start + k*W*b`` on every rank. The state (epoch, consumed) is replicated: rank 0
writes it once. A job restarted with ``W'`` ranks splits the rest of the epoch afresh, so
every sample of an epoch is consumed exactly once across world-size changes.

The tail (fewer than ``W*b`` samples left): with ``drop_last`` it is dropped (not consumed;
a later restart with fewer ranks may still use a whole step of it); otherwise it is one last
short step: it is split round-robin, padded by repeating its first samples so every rank
gets ``ceil(tail/W)`` samples (as ``DistributedSampler`` pads), so up to ``W-1`` samples
of that step are seen twice.

Consumption is counted from the indices handed out (a step is the batch the index belongs
to): exact for a ``DataLoader`` with ``num_workers=0``; with workers the loader prefetches, so
checkpoints record up to the prefetched batches as consumed.
"""

from __future__ import annotations

import logging
import math
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
    ``batch_size`` is this rank's batch and must match the loader's; it may be changed between
    steps (e.g. by an ``on_resize`` hook): ``consumed`` counts samples.
    """

    lattice_elastic = True  # the DataLoader adapter leaves positioning to this sampler

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world: int | None = None):
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

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed, self.exhausted = epoch, 0, False

    def permutation(self) -> list[int]:
        """The epoch's order, the same on every rank."""
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def _split(self, start: int) -> tuple[int, int]:
        """Whole steps of ``W*b`` samples left from ``start``, and the tail after them."""
        rest = self.n - start
        full = rest // (self.world * self.batch_size)
        return full, rest - full * self.world * self.batch_size

    def indices(self, start: int) -> list[int]:
        """This rank's indices of the epoch's remainder from global position ``start``, in order."""
        rest = self.permutation()[start:]
        full, tail = self._split(start)
        w, b = self.world, self.batch_size
        mine = rest[self.rank:full * w * b:w]
        if tail and not self.drop_last:
            t = rest[full * w * b:]
            per = math.ceil(tail / w)
            padded = [t[i % tail] for i in range(per * w)]
            mine += padded[self.rank::w]
        return mine

    def _done(self) -> int:
        """Samples consumed in this pass: steps begun times ``W*b`` (the tail step takes the tail)."""
        full, tail = self._split(self._start)
        steps = math.ceil(self._given / self.batch_size)
        whole = min(steps, full) * self.world * self.batch_size
        return whole + (tail if steps > full and not self.drop_last else 0)

    def __iter__(self) -> Iterator[int]:
        if self.exhausted:  # a new pass without set_epoch: the same epoch again, from its start
            self.consumed, self.exhausted = 0, False
        self._start, self._given = self.consumed, 0
        return self._run(self.indices(self._start))

    def _run(self, mine: list[int]) -> Iterator[int]:
        for i in mine:
            self._given += 1
            self.consumed = self._start + self._done()
            yield i
        self.consumed, self.exhausted = self._start + self._done(), True

    def __len__(self) -> int:
        """This rank's samples left in the epoch (all of it when the last pass ran to its end)."""
        start = 0 if self.exhausted else self.consumed
        full, tail = self._split(start)
        return full * self.batch_size + (math.ceil(tail / self.world) if tail and not self.drop_last else 0)

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


class ElasticSamplerAdapter(Adapter):
    """``ElasticSampler``: epoch and global consumption, replicated (the same on every rank)."""

    name = "lattice.elastic_sampler"
    per_rank = False
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, ElasticSampler)

    def save(self, obj: ElasticSampler) -> Any:
        return {"epoch": obj.epoch, "consumed": obj.consumed, "exhausted": obj.exhausted, "n": obj.n}

    def load(self, obj: ElasticSampler, tree: Any) -> Any:
        if tree["n"] != obj.n:
            log.warning("ElasticSampler: the checkpoint's dataset had %d samples, this one %d",
                        tree["n"], obj.n)
        obj.epoch, obj.consumed, obj.exhausted = tree["epoch"], min(tree["consumed"], obj.n), tree["exhausted"]
        obj._start, obj._given = obj.consumed, 0
        return obj
