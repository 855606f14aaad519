"""``lattice demo --simple``: one training process, killed and resumed.

It trains a small model three times on this machine: once uninterrupted (the reference),
then again with the training process SIGKILLed partway through and started again, which
resumes from its last committed checkpoint. It prints what was restored and checks that
the final weights of the interrupted run are bit-identical to the reference.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TRAIN = [sys.executable, "-u", "-m", "lattice.demo.train_mlp"]


def _run(args: list[str], kill_after_step: int | None = None, timeout: float = 300) -> int:
    """Run the training script, echoing its output; SIGKILL it once it reports ``kill_after_step``."""
    proc = subprocess.Popen(TRAIN + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "[train] step" not in line or line.split()[2] in ("1", "50", "100") or "restored" in line:
                sys.stdout.write("    " + line)
            if kill_after_step and not killed and line.startswith(f"[train] step {kill_after_step} "):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                print(f"    >>> SIGKILL sent to the training process after step {kill_after_step}")
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(workdir: str | None = None, epochs: int = 6, seed: int | None = None) -> int:
    from safetensors.numpy import load_file

    root = Path(workdir or tempfile.mkdtemp(prefix="lattice-demo-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    steps = epochs * 16
    kill_at = random.Random(seed).randint(steps // 4, 3 * steps // 4)
    common = ["--epochs", str(epochs), "--every", "10", "--sleep", "0.02"]
    print(f"== 1/3 reference run, uninterrupted ({steps} steps)")
    _run(common + ["--checkpoint-dir", str(root / "reference"), "--out", str(root / "reference.safetensors")])
    print(f"== 2/3 the same run, killed with SIGKILL after step {kill_at}")
    rc = _run(common + ["--checkpoint-dir", str(root / "ckpt")], kill_after_step=kill_at)
    print(f"    training process exited with {rc} (-9 = SIGKILL)")
    print("== 3/3 started again: it resumes from the last committed checkpoint")
    rc = _run(common + ["--checkpoint-dir", str(root / "ckpt"), "--out", str(root / "resumed.safetensors")])
    if rc != 0:
        print(f"resumed run failed with exit code {rc}")
        return 1
    a, b = load_file(str(root / "reference.safetensors")), load_file(str(root / "resumed.safetensors"))
    same = a.keys() == b.keys() and all(np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)) for k in a)
    print(f"== final weights bit-identical to the uninterrupted run: {'yes' if same else 'NO'}")
    print(f"   checkpoints: {root / 'ckpt'}  (try: lattice ckpt ls {root / 'ckpt'})")
    return 0 if same else 1
