"""A tiny training loop for `lattice local apply -f examples/local/job.yaml` (plain Python, no torch).

Each step does a little "work" (sleeps), counts it with ``lattice.step()`` and checkpoints by
the policy the agent passes in (``LATTICE_EVERY_STEPS``); started again, it resumes from the
newest checkpoint. Rank, world size and round come from the agent's environment. Options:
``--steps N`` (total, default 200), ``--sleep S`` (seconds per step, default 0.05).
"""

import argparse
import os
import time

import lattice


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sleep", type=float, default=0.05)
    args = p.parse_args()
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    state = lattice.register(progress=0, total=0.0)
    print(f"rank {rank} of {world}, round {os.environ.get('LATTICE_ROUND', '-')}, pid {os.getpid()}: "
          f"start at step {state.step}", flush=True)
    while state.step < args.steps:
        time.sleep(args.sleep)
        state.progress = state.step + 1
        state.total += 0.5
        print(f"step {state.step + 1}", flush=True)
        lattice.step()
    lattice.checkpoint()
    lattice.wait()
    print(f"done at step {state.step}", flush=True)


if __name__ == "__main__":
    main()
