"""Transparent-mode overhead in instructions, not seconds: immune to a noisy machine.

Runs the same small MLP training script as ``bench/overhead.py`` (64 -> 256 -> 10, Adam,
batch 64, ``num_workers=0``, one thread) under ``valgrind --tool=callgrind``, plain and under
``python -m lattice.auto`` with checkpointing off, for two step counts each; the per-step cost
is the difference divided by the extra steps, so start-up (imports, the freeze) cancels out.
Callgrind counts the main thread's instructions (with ``PYTHONHASHSEED=0``); the count is
repeatable for the same binary and inputs. It does not see memory stalls, so it complements, not replaces, the timed
benchmark. Takes about 6 minutes on 2 cores.

Run: ``.venv/bin/python bench/overhead_instructions.py [--steps 50 250]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import SETUP  # noqa: E402  (the same workload as the timed benchmark)

SCRIPT = r'''
import sys
steps = int(sys.argv[1])
''' + SETUP + r'''
k = 0
while k < steps:
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        k += 1
        if k >= steps:
            break
'''


def instructions(argv: list[str], env: dict[str, str], work: Path) -> int:
    """Instructions the main thread executed (other threads: torch's and Python's helpers, whose
    spin-waits vary from run to run); string hashing is fixed so both runs take the same paths."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes",
                          f"--callgrind-out-file={work}/cg.out", *argv],
                         env={**os.environ, "PYTHONHASHSEED": "0", **env}, cwd=work, capture_output=True,
                         text=True, timeout=1800)
    main = work / "cg.out-01"
    m = re.search(r"^summary: (\d+)", main.read_text(), re.M) if main.exists() else None
    if out.returncode != 0 or m is None:
        raise SystemExit(f"{argv} failed under valgrind:\n{out.stderr[-2000:]}")
    for f in work.glob("cg.out*"):
        f.unlink()
    return int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs=2, default=[50, 250], metavar=("FEW", "MANY"))
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    few, many = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "train.py").write_text(SCRIPT)
        variants = {"plain": ([sys.executable, "train.py"], {}),
                    "auto, no checkpoints": ([sys.executable, "-m", "lattice.auto", "train.py"],
                                             {"LATTICE_EVERY_STEPS": "0", "LATTICE_CHECKPOINT_DIR": str(work / "ckpt")})}
        per_step = {}
        for name, (argv, env) in variants.items():
            counts = [instructions([*argv, str(n)], env, work) for n in (few, many)]
            per_step[name] = (counts[1] - counts[0]) / (many - few)
            print(f"{name:22} {counts[0]:>15,} instructions for {few} steps, {counts[1]:>15,} for {many}: "
                  f"{per_step[name]:,.0f} per step", flush=True)
    plain, auto = per_step["plain"], per_step["auto, no checkpoints"]
    print(f"\ntransparent mode adds {auto - plain:,.0f} instructions per step: "
          f"{100 * (auto / plain - 1):+.2f}% (target for time: <= 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
