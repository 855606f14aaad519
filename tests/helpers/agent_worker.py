"""A worker for agent tests (no torch, starts fast): counts steps with lattice, optionally fails.

Options (argv): --steps N, --sleep S, --every K, --fail-rank R --fail-at STEP (SIGKILL itself
once, or on every start with --always-fail), --out DIR (writes env-<rank>-<pid>.json and appends
to starts.log).
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import lattice

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--sleep", type=float, default=0.05)
p.add_argument("--every", type=int, default=5)
p.add_argument("--fail-rank", type=int, default=-1)
p.add_argument("--fail-at", type=int, default=0)
p.add_argument("--always-fail", action="store_true")
p.add_argument("--out", required=True)
args = p.parse_args()
out = Path(args.out)
rank = int(os.environ["RANK"])
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "LATTICE_JOB",
        "LATTICE_ROUND", "LATTICE_CHECKPOINT_DIR", "LATTICE_CONTROL")
(out / f"env-{rank}-{os.getpid()}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
with open(out / "starts.log", "a") as f:
    f.write(f"{rank} {os.environ['WORLD_SIZE']} {os.environ['LATTICE_ROUND']}\n")
lattice.configure(every_steps=args.every)
state = lattice.register(progress=0)
print(f"start step {state.step} world {os.environ['WORLD_SIZE']}", flush=True)
marker = out / "failed-once"
while state.step < args.steps:
    time.sleep(args.sleep)
    state.progress = state.step + 1
    print(f"step {state.step + 1}", flush=True)  # the step's work is done; lattice.step() counts it
    lattice.step()
    if rank == args.fail_rank and state.step == args.fail_at and (args.always_fail or not marker.exists()):
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
lattice.checkpoint()
lattice.wait()
print(f"done {state.step}", flush=True)
