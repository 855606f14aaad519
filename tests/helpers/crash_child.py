"""A training loop that checkpoints as fast as it can, to be SIGKILLed by
``tests/test_crash_consistency.py`` at a random moment.

Every registered value is a deterministic function of the step (``state_at``), so whoever
restores a checkpoint can check that it holds exactly what was saved at its step. The
child prints ``start <restored step>`` once restored, then ``c <step>`` after each step it
knows to be committed (after ``lattice.wait()`` returned, or once ``last_committed``
reached it).

Modes: ``step-wait`` (``lattice.step()`` with every_steps=1 and on_busy="wait", then
``lattice.wait()``), ``explicit`` (``lattice.checkpoint()`` + ``lattice.wait()``),
``step-async`` (every_steps=1, on_busy="wait", never waits itself) and ``nowait``
(every_steps=1, on_busy="skip", never waits: most steps are skipped).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

N_WEIGHTS = 1 << 18  # float32: 1 MB
N_IDS = 1 << 17  # int64: 1 MB
TORCH_SHAPE = (256, 1024)  # float32: 1 MB, plus a bfloat16 copy


def state_at(step: int, use_torch: bool) -> dict[str, Any]:
    """The registered objects' values after ``step`` steps."""
    out: dict[str, Any] = {
        "weights": np.full(N_WEIGHTS, step, dtype=np.float32),
        "ids": np.arange(N_IDS, dtype=np.int64) * 3 + step,
        "flags": np.full((7, 3), step % 256, dtype=np.uint8),
        "meta": {"step": step, "tag": f"step-{step}", "history": [step - 2, step - 1, step], "loss": 1.0 / (step + 1)},
    }
    if use_torch:
        import torch

        out["t32"] = torch.full(TORCH_SHAPE, float(step), dtype=torch.float32)
        out["t16"] = torch.full((64, 32), float(step % 128), dtype=torch.bfloat16)
    return out


def set_state(objs: dict[str, Any], step: int, use_torch: bool) -> None:
    """Update the registered objects in place to their values after ``step`` steps."""
    new = state_at(step, use_torch)
    for name, value in new.items():
        if isinstance(value, dict):
            objs[name].clear()
            objs[name].update(value)
        elif isinstance(value, np.ndarray):
            objs[name][...] = value
        else:
            objs[name].copy_(value)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("mode", choices=["step-wait", "explicit", "step-async", "nowait"])
    p.add_argument("--torch", action="store_true")
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=60.0)  # in case nobody kills us
    args = p.parse_args()
    if args.torch:
        import torch  # noqa: F401  (before lattice.register, so the torch adapters load)
    import lattice

    lattice.configure(checkpoint_dir=args.dir, keep=args.keep,
                      every_steps=None if args.mode == "explicit" else 1,
                      on_busy="skip" if args.mode == "nowait" else "wait")
    objs = state_at(0, args.torch)
    state = lattice.register(**objs)
    objs = {name: getattr(state, name) for name in objs}
    restored = state.step
    want = state_at(restored, args.torch)
    for name, value in want.items():  # what we restored is exactly what was saved at its step
        got = objs[name]
        same = got == value if isinstance(value, dict) else bool((got == value).all())
        if not same:
            print(f"restored step {restored}: {name} does not hold that step's values", file=sys.stderr)
            return 3
    out = sys.stdout
    out.write(f"start {restored}\n")
    out.flush()
    session = lattice.session()
    reported = restored
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        step = state.step + 1
        set_state(objs, step, args.torch)
        lattice.step()
        if args.mode == "explicit":
            lattice.checkpoint()
        if args.mode in ("step-wait", "explicit"):
            path = lattice.wait()
            assert path is not None and path.name == f"step-{step:010d}", path
            out.write(f"c {step}\n")
            out.flush()
        elif session.last_committed is not None and session.last_committed > reported:
            reported = session.last_committed
            out.write(f"c {reported}\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
