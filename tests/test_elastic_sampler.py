"""Elastic data parallelism: ``ElasticSampler`` splits the rest of an epoch among the current ranks,
its global position is checkpointed once (replicated), and ``lattice.on_resize`` sees world-size
changes. The job test runs separate processes (RANK/WORLD_SIZE from the environment) 2 -> 3 -> 1."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import rank_procs
from hypothesis import given, settings
from hypothesis import strategies as st
from rank_procs import last_json, rank_env
from torch.utils.data.distributed import DistributedSampler

import lattice
from lattice.adapters.torch_elastic import ElasticSampler
from lattice.core import fmt

CHILD = str(Path(__file__).parent / "helpers" / "elastic_child.py")


def run_phase(directory: Path, out: Path, world: int, round_: int, steps: int, mode: str) -> dict[int, dict]:
    envs = {r: rank_env(r, world, "e", round_) for r in range(world)}
    got = {}
    for r, (code, stdout, stderr) in rank_procs.run_ranks([CHILD, str(directory), str(out), str(steps), mode],
                                                          envs, timeout=90).items():
        doc = last_json(stdout)
        assert code == 0 and doc is not None, f"rank {r} failed; stderr:\n{stderr}"
        got[r] = doc
    return got


def consumed(out: Path, round_: int) -> list[list[int]]:
    """Each batch (a line) that the ranks of ``round_`` consumed."""
    return [[int(i) for i in line.split()] for f in sorted(out.glob(f"consumed-{round_}-*.txt"))
            for line in f.read_text().splitlines()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["plain", "tracked"])
def test_two_three_one_ranks_consume_every_sample_once_keeping_the_global_batch(tmp_path: Path, mode: str) -> None:
    """Global batch 12: 2 ranks x 6 for 10 steps, 3 x 4 for 8 steps, then 1 x 12 to the end.

    ``tracked``: the registered loader prefetches with two worker processes, and only the
    batches it handed to the loop count as consumed; it follows the sampler's per-rank batch.
    """
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    first = run_phase(ckpt, out, world=2, round_=0, steps=10, mode=mode)
    assert all(g["consumed"] == 10 * 12 and g["resizes"] == [] and g["batch"] == 6 for g in first.values())
    second = run_phase(ckpt, out, world=3, round_=1, steps=8, mode=mode)
    assert all(g["consumed"] == 120 + 8 * 12 and g["resizes"] == [[2, 3]] and g["batch"] == 4
               for g in second.values())
    third = run_phase(ckpt, out, world=1, round_=2, steps=-1, mode=mode)
    assert third[0]["resizes"] == [[3, 1]] and third[0]["batch"] == 12
    assert third[0]["steps"] == (240 - 216) // 12 and third[0]["consumed"] == 240
    phases = [consumed(out, r) for r in range(3)]
    assert [{len(b) for b in p} for p in phases] == [{6}, {4}, {12}]  # the loader followed the policy
    assert [sum(map(len, p)) for p in phases] == [120, 96, 24]
    everything = Counter(i for p in phases for b in p for i in b)
    assert sorted(everything) == list(range(240)) and set(everything.values()) == {1}
    manifest = json.loads((ckpt / fmt.step_dirname(20) / fmt.MANIFEST).read_text())
    item = "sampler" if mode == "plain" else "loader_sampler"  # a registered loader brings its sampler
    assert manifest["items"][item]["scope"] == "shared"  # replicated: written once, by rank 0


def test_split_takes_strided_whole_batches_of_the_remainder() -> None:
    world, b = 3, 2
    samplers = [ElasticSampler(30, batch_size=b, seed=1, rank=r, world=world) for r in range(world)]
    perm = samplers[0].permutation()
    assert sorted(perm) == list(range(30)) and perm == samplers[2].permutation()
    for s in samplers:
        s.consumed = 6  # the job already took 6 samples of this epoch
    mine = [s.indices(6) for s in samplers]
    rest = perm[6:]
    assert mine == [rest[r::world] for r in range(world)]  # 24 = 4 whole steps of 3*2
    assert all(len(s) == 8 for s in samplers)
    # each step of the job consumes the next W*b positions of the remainder
    steps = [[m[k * b:(k + 1) * b] for m in mine] for k in range(4)]
    assert [sorted(i for part in st for i in part) for st in steps] == \
        [sorted(rest[k * 6:(k + 1) * 6]) for k in range(4)]
    it = iter(samplers[1])
    for _ in range(3):  # one and a half batches handed out: two steps begun
        next(it)
    assert samplers[1].consumed == 6 + 2 * world * b


def test_tail_is_padded_or_dropped_as_distributed_sampler_does() -> None:
    kept = [ElasticSampler(10, batch_size=2, shuffle=False, rank=r, world=3) for r in range(3)]
    assert [list(s) for s in kept] == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    assert all(s.consumed == 10 and s.exhausted for s in kept)
    dropped = [ElasticSampler(10, batch_size=2, shuffle=False, drop_last=True, rank=r, world=3) for r in range(3)]
    assert [list(s) for s in dropped] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]] and dropped[0].consumed == 9
    assert len(dropped[0]) == 3  # the next pass is the whole epoch again
    dropped[0].set_epoch(1)
    assert dropped[0].consumed == 0 and dropped[0].permutation() == list(range(10))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), world=st.integers(1, 5), shuffle=st.booleans(), seed=st.integers(0, 99),
       drop_last=st.booleans(), epoch=st.integers(0, 3))
def test_same_indices_as_distributed_sampler_while_the_world_is_unchanged(n, world, shuffle, seed, drop_last, epoch) -> None:
    """So swapping it in (transparent mode does) changes nothing in a run without resizes."""
    for r in range(world):
        ref = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=shuffle, seed=seed, drop_last=drop_last)
        ours = ElasticSampler(n, batch_size=3, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=r, world=world)
        ref.set_epoch(epoch)
        ours.set_epoch(epoch)
        assert list(ours) == list(ref) and len(ours) == len(ref)


def test_per_rank_batch_keeps_the_global_batch_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    assert ElasticSampler.per_rank_batch(24, 3) == 8 and not caplog.records
    assert ElasticSampler.per_rank_batch(24, 5) == 4
    assert ElasticSampler.per_rank_batch(24, 2, max_batch=8) == 8
    assert len([r for r in caplog.records if "cannot be kept" in r.message]) == 2


def test_on_resize_called_only_when_the_world_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    s = lattice.new_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"sampler": ElasticSampler(12, batch_size=2, rank=0, world=1)})
    s.checkpoint()
    s.wait()
    s.close()
    calls: list[tuple[int, int]] = []
    again = lattice.new_session(checkpoint_dir=str(tmp_path), every_steps=None)
    again.on_resize(lambda old, new: calls.append((old, new)))
    again.register({"sampler": ElasticSampler(12, batch_size=2, rank=0, world=1)})
    assert again.restored_world == 1 and calls == []
    again.restored_world = 2  # as if written by two ranks: a hook added after the restore runs at once
    again.on_resize(lambda old, new: calls.append((old, new)))
    assert calls == [(2, 1)]
    again.close()
