"""Killing the demo trainer with SIGKILL and starting it again ends with final weights that are
bit-identical to an uninterrupted run (16 batches per epoch)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
from safetensors.numpy import load_file  # noqa: E402

import lattice.cli  # noqa: E402

TRAIN = ["-m", "lattice.demo.train_mlp"]
EPOCHS = 3
BATCHES_PER_EPOCH = 16


def train(run_python, ckpt: Path, *extra: str):
    return run_python([*TRAIN, "--checkpoint-dir", str(ckpt), "--epochs", str(EPOCHS), *extra], timeout=90)


def same_bits(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
        and np.array_equal(x[k].view(np.uint8), y[k].view(np.uint8)) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_python) -> Path:
    root = tmp_path_factory.mktemp("reference")
    res = train(run_python, root / "ckpt", "--every", "5", "--out", str(root / "final.safetensors"))
    assert res.returncode == 0, res.stderr
    assert f"done at step {EPOCHS * BATCHES_PER_EPOCH}" in res.stdout
    return root / "final.safetensors"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kill_at, every, where", [
    (21, 5, "mid-epoch"),  # batch 5 of epoch 1
    (2 * BATCHES_PER_EPOCH, BATCHES_PER_EPOCH, "last batch"),  # checkpoints at epochs' last batches
])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path: Path, reference: Path, run_python,
                                                      kill_at: int, every: int, where: str) -> None:
    ckpt = tmp_path / "ckpt"
    # --sleep gives each background checkpoint time to commit before the next steps
    killed = train(run_python, ckpt, "--every", str(every), "--kill-at", str(kill_at), "--sleep", "0.02")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert f"[train] step {kill_at} " in killed.stdout
    assert "done at step" not in killed.stdout

    out = tmp_path / "final.safetensors"
    resumed = train(run_python, ckpt, "--every", str(every), "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    m = re.search(r"\[train\] restored step (\d+) from \S+: epoch (\d+)", resumed.stdout)
    assert m, resumed.stdout[:2000]
    step, epoch = int(m.group(1)), int(m.group(2))
    assert 0 < step <= kill_at and step % every == 0
    if where == "last batch":
        # saved inside the loop at an epoch's last batch: the epoch counter was not advanced yet
        assert step % BATCHES_PER_EPOCH == 0 and epoch == step // BATCHES_PER_EPOCH - 1
        assert "data loader at batch 16 of 16" in resumed.stdout
    else:
        assert epoch == step // BATCHES_PER_EPOCH
    assert f"done at step {EPOCHS * BATCHES_PER_EPOCH}" in resumed.stdout
    assert same_bits(out, reference), f"resumed from step {step} ({where}): final weights differ"


@pytest.mark.timeout(180)
def test_cli_demo_returns_zero(tmp_path: Path, capsys) -> None:
    rc = lattice.cli.main(["demo", "--simple", "--workdir", str(tmp_path / "demo"), "--epochs", "2", "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "bit-identical to the uninterrupted run: yes" in out
    assert same_bits(tmp_path / "demo" / "reference.safetensors", tmp_path / "demo" / "resumed.safetensors")
