"""examples/keras_train.py under ``lattice run``: the worker is SIGKILLed once mid-run, the agent
restarts it, it resumes from the newest checkpoint, and the final weights are bit-identical to
an uninterrupted run (TensorFlow on the CPU with op determinism is deterministic here)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "keras_train.py")
sys.path.insert(0, str(ROOT / "tests" / "runtime"))
from agent_support import LATTICE, Proc  # noqa: E402


@pytest.mark.timeout(300)
def test_keras_example_killed_once_under_lattice_run_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    flags = ["--epochs", "3", "--every-steps", "4", "--sleep", "0.15"]
    plain = subprocess.Popen([sys.executable, EXAMPLE, *flags, "--checkpoint-dir", str(tmp_path / "plain"),
                              "--out", str(tmp_path / "plain.npz")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run = Proc([*LATTICE, "run", "--no-spares", "--max-restarts", "2", "--checkpoint-dir", str(tmp_path / "ckpt"),
                EXAMPLE, *flags, "--out", str(tmp_path / "run.npz")], tmp_path)
    try:
        line = run.wait_for(lambda s: re.search(r"pid \d+ step (9|1\d)$", s) is not None, 200)
        os.kill(int(re.search(r"pid (\d+)", line)[1]), signal.SIGKILL)  # the worker, mid-epoch
        assert run.wait(200) == 0, run.text
        out, _ = plain.communicate(timeout=200)
        assert plain.returncode == 0, out
    finally:
        run.kill()
        if plain.poll() is None:
            os.killpg(plain.pid, signal.SIGKILL)
            plain.wait()
    starts = re.findall(r"pid (\d+) start at step (\d+)", run.text)
    assert len(starts) == 2 and starts[0][1] == "0", run.text  # killed once, restarted once
    resumed = int(starts[1][1])
    assert resumed in (8, 12, 16) and resumed <= int(re.search(r"step (\d+)$", line)[1]), run.text
    assert "done at step 24" in run.text  # 3 epochs of 8 batches, no batch trained twice
    a, b = np.load(tmp_path / "plain.npz"), np.load(tmp_path / "run.npz")
    assert len(a.files) == len(b.files) > 0
    for k in a.files:
        assert a[k].tobytes() == b[k].tobytes(), k
