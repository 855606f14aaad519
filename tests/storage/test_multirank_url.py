"""Several ranks on one host with an ``s3://`` checkpoint_dir: the ranks assemble the checkpoint in a
shared staging directory, rank 0 commits and uploads it; a restore on a fresh host downloads it once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from storage_support import make_bucket, s3_env

from lattice.core import fmt
from lattice.core.stores import open_store

CHILD = str(Path(__file__).parent.parent / "helpers" / "rank_child.py")


def run_ranks(mode: str, url: str, env: dict[str, str], world: int = 2) -> dict[int, dict]:
    procs = {r: subprocess.Popen([sys.executable, CHILD, mode, url], text=True, start_new_session=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**os.environ, **env, "RANK": str(r), "WORLD_SIZE": str(world),
                                      "LOCAL_WORLD_SIZE": str(world), "LATTICE_JOB": "t", "LATTICE_ROUND": "0"})
             for r in range(world)}
    out = {}
    try:
        for r, p in procs.items():
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr
            out[r] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return out


@pytest.mark.timeout(120)
def test_two_ranks_on_one_host_checkpoint_to_s3_and_restore_from_it(
        moto_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**s3_env(moto_server), "LATTICE_STAGING_DIR": str(tmp_path / "stage")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{make_bucket(moto_server)}/job"
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
