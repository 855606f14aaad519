"""``examples/torch_train.py`` under ``lattice run``: the worker is SIGKILLed once mid-run, the
agent restarts it, it resumes mid-epoch from the newest checkpoint and ends with weights
bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "torch_train.py")
sys.path.insert(0, str(ROOT / "tests" / "runtime"))
from agent_support import Proc  # noqa: E402

EPOCHS, EVERY, KILL_AFTER = 3, 5, 23  # 16 batches per epoch: the kill lands mid-epoch 1


@pytest.mark.timeout(240)
def test_killed_worker_resumes_to_bit_identical_weights(tmp_path: Path) -> None:
    common = ["--epochs", str(EPOCHS), "--every", str(EVERY)]
    subprocess.run([sys.executable, EXAMPLE, "--checkpoint-dir", str(tmp_path / "ref"), *common,
                    "--out", str(tmp_path / "ref.pt")], check=True, capture_output=True, timeout=120)
    job = Proc([sys.executable, "-m", "lattice.cli", "run", "--checkpoint-dir", str(tmp_path / "ckpt"),
                "--max-restarts", "1", EXAMPLE, *common, "--sleep", "0.03", "--out", str(tmp_path / "out.pt")],
               tmp_path)
    try:
        pid = int(re.search(r"pid (\d+): fresh start", job.wait_for(lambda ln: "fresh start" in ln, 120)).group(1))
        job.wait_for(lambda ln: f"[torch_train] step {KILL_AFTER} loss" in ln, 120)
        os.kill(pid, signal.SIGKILL)  # the worker, not the agent
        line = job.wait_for(lambda ln: "restored step" in ln, 120)
        restored = int(re.search(r"restored step (\d+)", line).group(1))
        assert job.wait(120) == 0, job.text[-3000:]
    finally:
        job.kill()
    assert 0 < restored <= KILL_AFTER and restored % EVERY == 0
    assert f"done at step {EPOCHS * 16}" in job.text
    got, want = torch.load(tmp_path / "out.pt"), torch.load(tmp_path / "ref.pt")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), f"resumed from step {restored}: weights differ"
