"""Checkpoints of a job with several ranks (separate processes sharing a directory, as under
torchrun or ``lattice run``): one commit per step only once every rank's part is written,
replicated state written once, per-rank state per rank, and the mapping after a world-size
change (new rank r takes old rank r's per-rank state; ranks beyond the old world start fresh)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import rank_procs
from rank_procs import last_json, rank_env
from safetensors import safe_open

import lattice
from lattice.core import fmt

CHILD = str(Path(__file__).parent / "helpers" / "rank_child.py")


def run_ranks(mode: str, directory: Path, world: int, round_: int, ranks: list[int] | None = None,
              timeout: float = 60.0, extra_env: dict[str, str] | None = None) -> dict[int, tuple[int, dict]]:
    envs = {r: {**rank_env(r, world, "t", round_), **(extra_env or {})}
            for r in (ranks if ranks is not None else range(world))}
    out = {}
    for r, (code, stdout, stderr) in rank_procs.run_ranks([CHILD, mode, str(directory)], envs, timeout).items():
        doc = last_json(stdout)
        assert doc is not None, f"rank {r} printed nothing; stderr:\n{stderr}"
        out[r] = (code, doc)
    return out


def fresh_next(rank: int) -> float:
    rng = random.Random(100 + rank)
    return rng.random()


@pytest.mark.timeout(120)
def test_three_ranks_commit_one_checkpoint_with_every_part(tmp_path: Path) -> None:
    saved = run_ranks("save", tmp_path, world=3, round_=0)
    assert all(code == 0 for code, _ in saved.values()), saved
    step_dir = tmp_path / fmt.step_dirname(5)
    manifest = json.loads((step_dir / fmt.MANIFEST).read_text())
    assert manifest["world_size"] == 3 and manifest["ranks"] == [0, 1, 2]
    assert set(manifest["files"]) == {fmt.DATA, fmt.TREE} | {f"rank-0000{r}.{e}" for r in range(3)
                                                              for e in ("safetensors", "json")}
    assert manifest["items"]["shared"]["scope"] == "shared" and manifest["items"]["__rng__"]["scope"] == "rank"
    with safe_open(str(step_dir / fmt.DATA), "np") as f:  # replicated state: written once, by rank 0
        assert "shared" in f.keys() and not any(k.startswith("__rng__") for k in f.keys())
    for r in range(3):
        with safe_open(str(step_dir / f"rank-0000{r}.safetensors"), "np") as f:
            assert "shared" not in f.keys()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # same world: every rank continues its own random stream where it was checkpointed
    loaded = run_ranks("load", tmp_path, world=3, round_=1)
    for r in range(3):
        code, got = loaded[r]
        assert code == 0 and got["step"] == 5 and got["shared"] == [7.0] * 4 and got["counter"] == 5
        assert got["next"] == saved[r][1]["next"]


@pytest.mark.timeout(120)
def test_world_size_change_maps_per_rank_state_by_rank(tmp_path: Path) -> None:
    saved = run_ranks("save", tmp_path, world=3, round_=0)
    shrunk = run_ranks("load", tmp_path, world=2, round_=1)
    for r in range(2):
        assert shrunk[r][1]["next"] == saved[r][1]["next"] and shrunk[r][1]["step"] == 5
    grown = run_ranks("load", tmp_path, world=4, round_=2)
    for r in range(3):
        assert grown[r][1]["next"] == saved[r][1]["next"]
    assert grown[3][1]["next"] == fresh_next(3)  # beyond the old world: fresh per-rank state
    assert all(g[1]["shared"] == [7.0] * 4 and g[1]["counter"] == 5 for g in grown.values())


@pytest.mark.timeout(120)
def test_no_commit_while_a_rank_is_missing_its_part(tmp_path: Path) -> None:
    run_ranks("save", tmp_path, world=2, round_=0)
    before = sorted(p.name for p in tmp_path.iterdir())
    # round 1 of a 3-rank job where rank 2 never writes: rank 0 gives the checkpoint up
    out = run_ranks("save", tmp_path, world=3, round_=1, ranks=[0, 1],
                    extra_env={"LATTICE_PART_TIMEOUT": "2"})
    assert out[0][0] == 3 and "rank(s) [2]" in out[0][1]["error"]
    committed = [p.name for p in tmp_path.iterdir() if fmt.parse_step_dirname(p.name) is not None]
    assert committed == [fmt.step_dirname(5)]
    manifest = json.loads((tmp_path / fmt.step_dirname(5) / fmt.MANIFEST).read_text())
    assert manifest["world_size"] == 2  # the earlier, complete checkpoint is untouched
    assert fmt.step_dirname(5) in before
    abandoned = [p for p in tmp_path.iterdir() if ".tmp-job_t_r1_c" in p.name]
    assert len(abandoned) == 1
    # the next round's rank 0 removes the abandoned temporary directory when it starts
    run_ranks("load", tmp_path, world=3, round_=2, ranks=[0])
    assert not abandoned[0].exists()


@pytest.mark.timeout(60)
def test_single_process_checkpoint_counts_as_rank_zero(tmp_path: Path) -> None:
    saved = run_ranks("save", tmp_path, world=1, round_=0)
    loaded = run_ranks("load", tmp_path, world=2, round_=1)
    assert loaded[0][1]["next"] == saved[0][1]["next"]
    assert loaded[1][1]["next"] == fresh_next(1) and loaded[1][1]["counter"] == 5


def test_bad_rank_environment_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(lattice.ConfigError, match="RANK=3 is not in 0..WORLD_SIZE-1"):
        lattice.new_session(checkpoint_dir=str(tmp_path))
