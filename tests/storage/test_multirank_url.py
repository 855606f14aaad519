"""Several ranks with a URL as checkpoint_dir.

On one host (``s3://``): the ranks assemble the checkpoint in a shared staging directory, rank 0
commits and uploads it; a restore on a fresh host downloads it once. On several hosts (each rank
its own staging directory, ``LOCAL_WORLD_SIZE`` 1; ``s3://`` and ``lattice://``): each rank puts
its part into the store and rank 0 commits there (stores/assemble.py)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import crc32c
import pytest
import rank_procs
from rank_procs import rank_env
from storage_support import s3_env

from lattice.core import fmt
from lattice.core.stores import open_store

CHILD = str(Path(__file__).parent.parent / "helpers" / "rank_child.py")


def run_ranks(mode: str, url: str, env: dict[str, str], world: int = 2, hosts: Path | None = None,
              ranks: list[int] | None = None, failing: tuple[int, ...] = ()) -> dict[int, dict]:
    """Run ranks ``ranks`` (default all) of a ``world``-rank job; with ``hosts``, each rank is on a
    host of its own (``LOCAL_WORLD_SIZE=1``, staging in ``hosts/host-<r>``)."""
    def env_of(r: int) -> dict[str, str]:
        e = {**env, **rank_env(r, world, "t"), "LOCAL_WORLD_SIZE": str(world)}
        if hosts is not None:
            e.update(LOCAL_WORLD_SIZE="1", LOCAL_RANK="0", LATTICE_STAGING_DIR=str(hosts / f"host-{r}"))
        return e

    envs = {r: env_of(r) for r in (range(world) if ranks is None else ranks)}
    out = {}
    for r, (code, stdout, stderr) in rank_procs.run_ranks([CHILD, mode, url], envs).items():
        assert (code != 0) == (r in failing), stderr
        out[r] = rank_procs.last_json(stdout)
    return out


@pytest.mark.timeout(120)
def test_two_ranks_on_one_host_checkpoint_to_s3_and_restore_from_it(
        s3: str, moto_server: str, tmp_path: Path) -> None:
    env = {**s3_env(moto_server), "LATTICE_STAGING_DIR": str(tmp_path / "stage")}
    url = f"{s3}/job"
    saved = run_ranks("save", url, env)
    store = open_store(url)
    assert store.list_committed() == [5]
    manifest = fmt.parse_manifest(store.read_manifest(5))
    assert manifest["world_size"] == 2 and {"rank-00000.json", "rank-00001.json"} <= set(manifest["files"])

    shutil.rmtree(tmp_path / "stage")  # a fresh host: everything comes from S3
    loaded = run_ranks("load", url, env)
    for r in (0, 1):
        assert loaded[r]["step"] == 5 and loaded[r]["shared"] == [7.0] * 4 and loaded[r]["counter"] == 5
        assert loaded[r]["next"] == saved[r]["next"]  # each rank got its own RNG state back


@pytest.fixture(params=["s3", "lattice"])
def remote(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """A fresh remote store URL and the environment the ranks need for it."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3')}/job", s3_env(request.getfixturevalue("moto_server"))
    address, token, _ = request.getfixturevalue("service_server")
    monkeypatch.setenv("LATTICE_SERVICE_TOKEN", token)
    return f"lattice://{address}/job-{uuid.uuid4().hex[:10]}", {"LATTICE_SERVICE_TOKEN": token}


@pytest.mark.timeout(120)
def test_ranks_on_three_hosts_assemble_one_checkpoint_in_the_store(remote: tuple[str, dict], tmp_path: Path) -> None:
    url, env = remote
    store = open_store(url)
    # a declaration of rank 1 left in the store by an earlier attempt at step 5: never taken for this one
    stale = tmp_path / "stale.json"
    stale.write_bytes(json.dumps({"rank": 1, "tag": "job_t_r0_c7", "files": {"rank-00001.json": {"size": 1,
                                                                                             "crc32c": 0}}}).encode())
    store.put_file(5, "rank-00001.part.json", stale, stale.stat().st_size, crc32c.crc32c(stale.read_bytes()))

    saved = run_ranks("save", url, env, world=3, hosts=tmp_path / "save")
    assert store.list_committed() == [5]
    manifest = fmt.parse_manifest(store.read_manifest(5))
    assert manifest["world_size"] == 3
    assert {f"rank-0000{r}.json" for r in range(3)} | {fmt.DATA, fmt.TREE} <= set(manifest["files"])
    assert not any(n.endswith(".part.json") for n in manifest["files"])
    for r in range(3):  # nothing stays behind in the hosts' staging directories
        assert not [p for p in (tmp_path / "save" / f"host-{r}").rglob("*") if p.is_file() and p.name != ".lock"]

    loaded = run_ranks("load", url, env, world=3, hosts=tmp_path / "load")  # fresh hosts: all from the store
    for r in range(3):
        assert loaded[r]["step"] == 5 and loaded[r]["shared"] == [7.0] * 4 and loaded[r]["counter"] == 5
        assert loaded[r]["next"] == saved[r]["next"]  # each rank got its own RNG state back


@pytest.mark.timeout(120)
def test_a_missing_rank_on_another_host_leaves_nothing_committed(remote: tuple[str, dict], tmp_path: Path) -> None:
    url, env = remote
    out = run_ranks("save", url, {**env, "LATTICE_PART_TIMEOUT": "3"}, world=3, hosts=tmp_path, ranks=[0, 2],
                    failing=(0,))  # rank 2 puts its part and is done; rank 0 waits for rank 1 in vain
    assert "rank(s) [1] did not put their part" in out[0]["error"]
    assert open_store(url).list_committed() == []


@pytest.mark.timeout(60)
def test_each_host_keeps_only_keep_downloads_in_its_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks on several hosts: a host's staging directory holds only the checkpoints it downloaded;
    its first rank prunes them to ``keep`` on restore, so restarts do not pile them up."""
    import numpy as np

    import lattice
    from lattice.core.stores import transfer

    local = tmp_path / "local"
    for step in (1, 2, 3, 4):  # four committed checkpoints, made by one process
        s = lattice.new_session(checkpoint_dir=str(local), every_steps=None, keep=10, capture_rng=False)
        arr = np.zeros(16)
        s.register({"w": arr})  # restores the previous one into arr; then this step's value
        arr[:] = step
        s.step = step
        s.checkpoint()
        s.wait()
        s.close()
    url = f"memory://t-{uuid.uuid4().hex[:10]}/job"
    transfer.upload(local / fmt.step_dirname(4), open_store(url), 4)
    stage = tmp_path / "stage"
    stage.mkdir()
    for step in (1, 2, 3):  # downloads of earlier restarts
        shutil.copytree(local / fmt.step_dirname(step), stage / fmt.step_dirname(step))
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0",
                 "LATTICE_STAGING_DIR": str(stage), "LATTICE_JOB": "t"}.items():
        monkeypatch.setenv(k, v)
    s = lattice.new_session(checkpoint_dir=url, every_steps=None, keep=2, capture_rng=False)
    w = np.zeros(16)
    s.register({"w": w})
    s.close()
    assert s.restored is not None and s.restored.step == 4 and (w == 4.0).all()
    assert sorted(p.name for p in stage.iterdir() if p.name.startswith("step-") and "." not in p.name) == [
        fmt.step_dirname(3), fmt.step_dirname(4)]
