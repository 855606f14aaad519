"""``examples/jax_train.py`` (flax + optax) under ``lattice run``: the worker is SIGKILLed once
mid-run, the agent restarts it, it resumes from the newest checkpoint and ends with parameters
bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "jax_train.py")
STEPS, EVERY, KILL_AFTER = 30, 5, 13


class Lines:
    """A process in its own group whose merged output is collected line by line."""

    def __init__(self, args: list[str], cwd: Path):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(args, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.timeout(240)
def test_killed_worker_resumes_to_bit_identical_parameters(tmp_path: Path) -> None:
    common = ["--steps", str(STEPS), "--every", str(EVERY)]
    ref = Lines([sys.executable, EXAMPLE, "--checkpoint-dir", str(tmp_path / "ref"), *common,
                 "--out", str(tmp_path / "ref.npz")], tmp_path)  # the uninterrupted run, alongside
    job = Lines([sys.executable, "-m", "lattice.cli", "run", "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--max-restarts", "1", "--spare-preload", "jax,flax.linen,optax,lattice",
                 EXAMPLE, *common, "--sleep", "0.05", "--out", str(tmp_path / "out.npz")], tmp_path)
    try:
        pid = int(job.wait_for(r"\[jax_train\] pid (\d+): fresh start", 120).group(1))
        job.wait_for(rf"\[jax_train\] step {KILL_AFTER} ", 120)
        os.kill(pid, signal.SIGKILL)  # the worker, not the agent
        restored = int(job.wait_for(r"\[jax_train\] pid \d+: restored step (\d+)", 120).group(1))
        assert job.proc.wait(120) == 0, "\n".join(job.lines[-40:])
        assert ref.proc.wait(120) == 0, "\n".join(ref.lines[-40:])
    finally:
        job.kill()
        ref.kill()
    assert any(f"done at step {STEPS}" in line for line in ref.lines)
    assert 0 < restored <= KILL_AFTER and restored % EVERY == 0
    assert any(f"done at step {STEPS}" in line for line in job.lines)
    got, want = params(tmp_path / "out.npz"), params(tmp_path / "ref.npz")
    assert got.keys() == want.keys() and len(want) == 4
    assert all(got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes() for k in want), \
        f"resumed from step {restored}: final parameters differ"
