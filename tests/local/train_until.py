"""Training command of the local e2e tests (plain Python, starts fast): counts steps with
lattice until the step written in the release file (``--release``), then checkpoints and
exits 0. Bounded: never more than ``--max-steps`` steps. Each step sleeps ``--sleep`` s."""

import argparse
import os
import time
from pathlib import Path

import lattice

p = argparse.ArgumentParser()
p.add_argument("--release", required=True)
p.add_argument("--max-steps", type=int, default=3000)
p.add_argument("--sleep", type=float, default=0.05)
args = p.parse_args()
release = Path(args.release)
state = lattice.register(progress=0)
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} start at step {state.step} "
      f"greeting={os.environ.get('GREETING')}", flush=True)


def final() -> int:
    try:
        return min(int(release.read_text().strip()), args.max_steps)
    except (FileNotFoundError, ValueError):
        return args.max_steps


while state.step < final():
    time.sleep(args.sleep)
    state.progress = state.step + 1
    print(f"step {state.step + 1}", flush=True)
    lattice.step()
lattice.checkpoint()
lattice.wait()
print(f"done at step {state.step}", flush=True)
