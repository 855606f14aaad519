"""Transparent-mode overhead: per-step time of a small MLP training step under
``python -m lattice.auto`` against plain ``python``, in the same run.

The training script (written to a temp dir; it never mentions Lattice) trains a 2-layer MLP
(64 -> 256 -> 10) with Adam on batches of 64 from a ``DataLoader`` over an in-memory
``TensorDataset`` (``num_workers=0``, shuffled), with ``torch.set_num_threads(1)``. It takes a
``time.perf_counter()`` stamp at the start of every loop body; a step's time is the gap to the
next stamp, so it covers the loader's batch request, where transparent mode counts the step
and takes a checkpoint when one is due. The first ``--warmup`` steps (the freeze included)
are dropped.

Variants, each run as its own subprocess, alternating in a rotating order every round:

- ``plain``: ``python script.py``
- ``auto, no checkpoints``: ``python -m lattice.auto script.py`` with ``LATTICE_EVERY_STEPS=0``
  (the patches and hooks run, the session counts steps, nothing is written). Target <= 2%.
- ``auto, every step, skip`` / ``wait``: ``LATTICE_EVERY_STEPS=1`` with ``LATTICE_ON_BUSY``
  ``skip`` / ``wait`` (checkpoint directory in a temp dir on the working directory's disk).

Overhead is the median over rounds of (variant's median step / the same round's plain median
step) - 1. Mean step time (total / steps) is shown too: with a checkpoint every step, the
skipped ones make the median cheap while the mean carries the checkpoints.

Run: ``.venv/bin/python bench/overhead.py [--rounds 7] [--steps 3000] [--ckpt-steps 600]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the workload both overhead benchmarks run (bench/overhead_instructions.py too)
SETUP = r'''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(1)
torch.manual_seed(0)
n = 64 * 100
data = TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))
loader = DataLoader(data, batch_size=64, shuffle=True, num_workers=0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()
'''

SCRIPT = r'''
import json, sys, time
steps, warmup = int(sys.argv[1]), int(sys.argv[2])
''' + SETUP + r'''
stamps = []
total = steps + warmup + 1
while len(stamps) < total:
    for x, y in loader:
        stamps.append(time.perf_counter())
        if len(stamps) >= total:
            break
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
gaps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
print("RESULT " + json.dumps(gaps), flush=True)
'''

# name -> (under lattice.auto, env, uses the long step count, target)
VARIANTS = {
    "plain": (False, {}, True, None),
    "auto, no checkpoints": (True, {"LATTICE_EVERY_STEPS": "0"}, True, 0.02),
    "auto, every step, skip": (True, {"LATTICE_EVERY_STEPS": "1", "LATTICE_ON_BUSY": "skip"}, False, None),
    "auto, every step, wait": (True, {"LATTICE_EVERY_STEPS": "1", "LATTICE_ON_BUSY": "wait"}, False, None),
}
SHORT = {"off": "auto, no checkpoints", "skip": "auto, every step, skip", "wait": "auto, every step, wait"}


def run_one(name: str, script: Path, steps: int, warmup: int, workdir: Path) -> list[float]:
    auto, extra, _, _ = VARIANTS[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATTICE_")}
    env.update(extra, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(dir=workdir) as ckpt:
        env["LATTICE_CHECKPOINT_DIR"] = ckpt
        cmd = [sys.executable, *(["-m", "lattice.auto"] if auto else []), str(script),
               str(steps), str(warmup)]
        proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{name}: no RESULT line\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3000, help="timed steps, plain and no checkpoints")
    ap.add_argument("--ckpt-steps", type=int, default=600, help="timed steps, checkpoint every step")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--only", default="", help="comma-separated variants besides plain: off,skip,wait")
    ap.add_argument("--json", help="write the raw per-run medians and means here")
    args = ap.parse_args()

    names = list(VARIANTS)
    if args.only:
        keep = {SHORT[s.strip()] for s in args.only.split(",")}
        names = ["plain", *(n for n in names[1:] if n in keep)]
    medians: dict[str, list[float]] = {n: [] for n in names}
    means: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        work = Path(tmp)
        script = work / "train.py"
        script.write_text(SCRIPT)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                steps = args.steps if VARIANTS[name][2] else args.ckpt_steps
                gaps = run_one(name, script, steps, args.warmup, work)
                medians[name].append(statistics.median(gaps))
                means[name].append(sum(gaps) / len(gaps))
                print(f"round {r + 1} {name:24s} median {medians[name][-1] * 1e6:8.1f} us  "
                      f"mean {means[name][-1] * 1e6:8.1f} us", file=sys.stderr, flush=True)

    print(f"\n{args.rounds} rounds, {time.monotonic() - t0:.0f} s; per-step medians of "
          f"{args.steps} steps ({args.ckpt_steps} with a checkpoint every step)\n")
    print("| variant | median step | mean step | overhead (median) | overhead (mean) | target | result |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        med, mean = statistics.median(medians[name]), statistics.median(means[name])
        ratio = statistics.median(a / b for a, b in zip(medians[name], medians["plain"], strict=True)) - 1
        ratio_mean = statistics.median(a / b for a, b in zip(means[name], means["plain"], strict=True)) - 1
        target = VARIANTS[name][3]
        if name == "plain":
            over, over_mean, tgt, res = "-", "-", "-", "-"
        else:
            over, over_mean = f"{ratio * 100:+.1f}%", f"{ratio_mean * 100:+.1f}%"
            tgt = f"<= {target * 100:.0f}%" if target is not None else "(info)"
            res = ("PASS" if ratio <= target else "FAIL") if target is not None else "-"
        print(f"| {name} | {med * 1e6:.1f} us | {mean * 1e6:.1f} us | {over} | {over_mean} | {tgt} | {res} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": medians, "means": means}, indent=1))


if __name__ == "__main__":
    main()
