"""A worker for the memory-tier tests (no torch): a numpy state of --size-kb, counted steps, one SIGKILL.

While ``lattice.register`` restores, an audit hook appends every file the process opens under
``LATTICE_CHECKPOINT_DIR`` (tag ``storage``) or ``LATTICE_MEMORY_DIR`` (tag ``memory``) to
``<out>/opens-<pid>.txt``, so a test can tell which tier a restore read (written line by line:
the process may be SIGKILLed later).

Options: --steps N, --sleep S, --every K, --size-kb KB, --fail-at STEP (SIGKILL itself once),
--out DIR. Prints ``start step N from PATH`` (PATH: the checkpoint restored, or None).
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import lattice

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--sleep", type=float, default=0.05)
p.add_argument("--every", type=int, default=5)
p.add_argument("--size-kb", type=int, default=64)
p.add_argument("--fail-at", type=int, default=0)
p.add_argument("--out", required=True)
args = p.parse_args()
out = Path(args.out)
roots = {tag: os.path.realpath(os.environ[var]) for tag, var in
         (("storage", "LATTICE_CHECKPOINT_DIR"), ("memory", "LATTICE_MEMORY_DIR")) if os.environ.get(var)}
log = open(out / f"opens-{os.getpid()}.txt", "a", buffering=1)  # noqa: SIM115 - lives as long as the process
recording = True


def audit(event: str, hook_args: tuple) -> None:
    if not recording or event != "open" or not isinstance(hook_args[0], str | bytes | os.PathLike):
        return
    path = os.path.realpath(os.fsdecode(hook_args[0]))
    for tag, root in roots.items():
        if path == root or path.startswith(root + os.sep):
            log.write(f"{tag} {path}\n")


sys.addaudithook(audit)
lattice.configure(every_steps=args.every)
state = lattice.register(progress=0, weights=np.zeros(args.size_kb * 256, dtype=np.float32))
recording = False
print(f"start step {state.step} from {state.restored_from}", flush=True)
assert state.progress == state.step and float(state.weights[-1]) == state.step, "restored state does not match"
marker = out / "failed-once"
while state.step < args.steps:
    time.sleep(args.sleep)
    state.progress = state.step + 1
    state.weights[:] = state.step + 1
    print(f"step {state.step + 1}", flush=True)
    lattice.step()
    if state.step == args.fail_at and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
lattice.checkpoint()
lattice.wait()
assert state.progress == state.step and float(state.weights[0]) == state.step, "state does not match its step"
print(f"done {state.step}", flush=True)
