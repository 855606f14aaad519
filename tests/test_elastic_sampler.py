"""Elastic data parallelism: ``ElasticSampler`` splits the rest of an epoch among the current ranks,
its global position is checkpointed once (replicated), and ``lattice.on_resize`` sees world-size
changes. The job test runs separate processes (RANK/WORLD_SIZE from the environment) 2 -> 3 -> 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import lattice
from lattice.adapters.torch_elastic import ElasticSampler
from lattice.core import fmt

CHILD = str(Path(__file__).parent / "helpers" / "elastic_child.py")


def run_phase(directory: Path, out: Path, world: int, round_: int, steps: int) -> dict[int, dict]:
    procs = {}
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LATTICE_JOB": "e",
               "LATTICE_ROUND": str(round_)}
        procs[r] = subprocess.Popen([sys.executable, CHILD, str(directory), str(out), str(steps)], env=env,
                                    text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
    got = {}
    try:
        for r, p in procs.items():
            stdout, stderr = p.communicate(timeout=90)
            lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
            assert p.returncode == 0 and lines, f"rank {r} failed; stderr:\n{stderr}"
            got[r] = json.loads(lines[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return got


def consumed(out: Path, round_: int) -> list[int]:
    return [int(i) for f in sorted(out.glob(f"consumed-{round_}-*.txt")) for i in f.read_text().split()]


@pytest.mark.timeout(240)
def test_two_three_one_ranks_consume_every_sample_once(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    first = run_phase(ckpt, out, world=2, round_=0, steps=10)
    assert all(g["consumed"] == 10 * 2 * 4 and g["resizes"] == [] for g in first.values())
    second = run_phase(ckpt, out, world=3, round_=1, steps=8)
    assert all(g["consumed"] == 80 + 8 * 3 * 4 and g["resizes"] == [[2, 3]] for g in second.values())
    third = run_phase(ckpt, out, world=1, round_=2, steps=-1)
    assert third[0]["resizes"] == [[3, 1]] and third[0]["steps"] == (240 - 176) // 4
    assert third[0]["consumed"] == 240
    phases = [consumed(out, r) for r in range(3)]
    assert [len(p) for p in phases] == [80, 96, 64]
    everything = Counter(i for p in phases for i in p)
    assert sorted(everything) == list(range(240)) and set(everything.values()) == {1}
    manifest = json.loads((ckpt / fmt.step_dirname(34) / fmt.MANIFEST).read_text())
    assert manifest["items"]["sampler"]["scope"] == "shared"  # replicated: written once, by rank 0


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


def test_tail_is_padded_or_dropped() -> None:
    kept = [ElasticSampler(10, batch_size=2, shuffle=False, rank=r, world=3) for r in range(3)]
    assert [list(s) for s in kept] == [[0, 3, 6, 9], [1, 4, 7, 6], [2, 5, 8, 7]]
    assert all(s.consumed == 10 and s.exhausted for s in kept)
    dropped = [ElasticSampler(10, batch_size=2, shuffle=False, drop_last=True, rank=r, world=3) for r in range(3)]
    assert [list(s) for s in dropped] == [[0, 3], [1, 4], [2, 5]] and dropped[0].consumed == 6
    assert len(dropped[0]) == 2  # the next pass is the whole epoch again
    dropped[0].set_epoch(1)
    assert dropped[0].consumed == 0 and dropped[0].permutation() == list(range(10))


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
