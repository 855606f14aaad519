"""The agent and ``lattice run`` with real processes: worker failure and restart from the
newest checkpoint, the job-wide restart budget, SIGTERM as a planned stop that loses no step,
the torchrun-compatible worker environment, and bad command lines."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from agent_support import LATTICE, WORKER, Proc

from lattice.core import inspect as ckpt


def run_cmd(tmp: Path, *flags: str, worker: list[str]) -> list[str]:
    return [*LATTICE, "run", "--checkpoint-dir", str(tmp / "ckpt"), *flags, WORKER, "--out", str(tmp), *worker]


def starts(tmp: Path) -> list[str]:
    return (tmp / "starts.log").read_text().split("\n")[:-1]


@pytest.mark.timeout(120)
def test_failed_worker_restarts_all_workers_from_newest_checkpoint(tmp_path: Path) -> None:
    p = Proc(run_cmd(tmp_path, "--nproc-per-node", "2", "--max-restarts", "2",
                     worker=["--steps", "25", "--fail-rank", "1", "--fail-at", "12"]), tmp_path)
    try:
        assert p.wait(100) == 0, p.text
    finally:
        p.kill()
    assert len(starts(tmp_path)) == 4  # 2 workers, started twice
    # both ranks restart from the newest committed checkpoint: step 10, or step 5 when rank 0 had
    # not yet committed step 10 (it waits for every rank's part) at the moment rank 1 died at 12
    restarts = re.findall(r"\[rank(\d)\]: start step (\d+) world 2", p.text)[2:]
    assert len(restarts) == 2 and restarts[0][1] == restarts[1][1] and restarts[0][1] in ("5", "10"), restarts
    assert "[rank0]: done 25" in p.text and "[rank1]: done 25" in p.text
    envs = [json.loads(f.read_text()) for f in tmp_path.glob("env-*.json")]
    assert sorted(e["TORCHELASTIC_RESTART_COUNT"] for e in envs) == ["0", "0", "1", "1"]
    assert ckpt.listing(tmp_path / "ckpt").committed[0][0] == 25


@pytest.mark.timeout(120)
def test_restart_budget_is_enforced_and_the_exit_code_reported(tmp_path: Path) -> None:
    p = Proc(run_cmd(tmp_path, "--max-restarts", "2",
                     worker=["--steps", "20", "--fail-rank", "0", "--fail-at", "3", "--always-fail"]), tmp_path)
    try:
        code = p.wait(100)
    finally:
        p.kill()
    assert code != 0
    assert len(starts(tmp_path)) == 3  # the first start and two restarts
    assert "restart budget (2) is spent" in p.text


@pytest.mark.timeout(120)
def test_sigterm_checkpoints_at_the_next_step_and_loses_none(tmp_path: Path) -> None:
    p = Proc(run_cmd(tmp_path, "--nproc-per-node", "2", worker=["--steps", "400", "--every", "1000"]), tmp_path)
    try:
        p.wait_for(lambda line: line == "[rank0]: step 7", 60)
        p.signal(signal.SIGTERM)
        assert p.wait(60) == 0, p.text
    finally:
        p.kill()
    last = {r: max(int(m) for m in re.findall(rf"\[rank{r}\]: step (\d+)", p.text)) for r in (0, 1)}
    committed = ckpt.listing(tmp_path / "ckpt").committed
    assert committed, p.text
    assert committed[0][0] == last[0] == last[1]  # every completed step is in the checkpoint


@pytest.mark.timeout(60)
def test_workers_get_a_torchrun_compatible_environment(tmp_path: Path) -> None:
    p = Proc(run_cmd(tmp_path, "--nproc-per-node", "2", "--rdzv-id", "envjob", "--max-restarts", "5",
                     worker=["--steps", "2"]), tmp_path)
    try:
        assert p.wait(50) == 0, p.text
    finally:
        p.kill()
    envs = sorted((json.loads(f.read_text()) for f in tmp_path.glob("env-*.json")), key=lambda e: e["RANK"])
    assert [e["RANK"] for e in envs] == ["0", "1"] and [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    for e in envs:
        assert e["WORLD_SIZE"] == "2" and e["LOCAL_WORLD_SIZE"] == "2" and e["GROUP_RANK"] == "0"
        assert e["MASTER_ADDR"] == "127.0.0.1" and int(e["MASTER_PORT"]) > 0
        assert e["TORCHELASTIC_RUN_ID"] == "envjob" == e["LATTICE_JOB"]
        assert e["TORCHELASTIC_MAX_RESTARTS"] == "5" and e["TORCHELASTIC_RESTART_COUNT"] == "0"
        assert e["LATTICE_CHECKPOINT_DIR"] == str(tmp_path / "ckpt") and e["LATTICE_CONTROL"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "3:1"], "--nnodes '3:1': need 1 <= MIN <= MAX"),
    (["--nnodes", "two"], "--nnodes 'two': expected N or MIN:MAX"),
    (["--rdzv-backend", "zookeeper"], "--rdzv-backend 'zookeeper' is unknown; use one of embedded, consul, etcd"),
    (["--rdzv-backend", "etcd"], "--rdzv-backend etcd needs --rdzv-endpoint"),
    (["--rdzv-endpoint", "127.0.0.1:9"], "--rdzv-endpoint 127.0.0.1:9: cannot reach the embedded store"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
])
def test_bad_command_lines_are_refused_with_a_clear_message(tmp_path: Path, flags: list[str], message: str) -> None:
    p = Proc([*LATTICE, "run", *flags, WORKER, "--out", str(tmp_path)], tmp_path)
    try:
        assert p.wait(30) == 2
    finally:
        p.kill()
    assert message in p.text, p.text
    assert not (tmp_path / "starts.log").exists()
