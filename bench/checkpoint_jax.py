#!/usr/bin/env python
"""JAX checkpoint benchmark: Lattice against orbax ``CheckpointManager`` async save.

One process, one pytree (``--arrays`` float32 ``jax.Array`` leaves, ``--size-mb`` MiB in all),
saved repeatedly by both, repetitions interleaved (the order alternates) so disk noise spreads
over both; one warm-up save each is not counted; medians are reported with the ratios.

    .venv/bin/python bench/checkpoint_jax.py [--size-mb 1024] [--arrays 64] [--reps 5] [--dir DIR]

- blocking: how long the training loop is held. Lattice: ``session.checkpoint()`` (the copy
  into the reused host buffer). orbax: ``CheckpointManager.save(step, args=StandardSave(tree))``
  with ``enable_async_checkpointing=True`` (its device-to-host copy plus its setup).
- committed: from the same call until the checkpoint is durable and final. Lattice:
  ``session.wait()`` (data + tree fsynced, manifest, atomic rename, ``latest``, retention).
  orbax: ``wait_until_finished()`` (TensorStore writes, metadata, commit rename, retention).
Both keep one checkpoint (``keep=1`` / ``max_to_keep=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import remove, settle  # noqa: E402  (helpers of the PyTorch benchmark)

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def make_tree(size_mb: int, arrays: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    elems = size_mb * MiB // 4 // arrays
    shape = (elems // 1024, 1024) if elems % 1024 == 0 else (elems,)
    key = jax.random.key(0)
    tree = {f"layer{i:02d}": {"w": jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)}
            for i in range(arrays)}
    jax.block_until_ready(tree)
    return tree


class Lattice:
    name = "lattice"

    def __init__(self, root: Path, tree: Any):
        import lattice

        self.session = lattice.new_session(checkpoint_dir=str(root / "lattice"), keep=1, every_steps=None,
                                           capture_rng=False, restore=False)
        self.state = self.session.register({"params": tree})
        self.step = 0

    def save(self, tree: Any) -> tuple[float, float]:
        self.state.params = tree
        self.step += 1
        self.session.step = self.step
        t0 = time.perf_counter()
        self.session.checkpoint()
        t1 = time.perf_counter()
        self.session.wait()
        return t1 - t0, time.perf_counter() - t0

    def close(self) -> None:
        self.session.close()


class Orbax:
    name = "orbax"

    def __init__(self, root: Path, tree: Any):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        opts = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True)
        self.mngr = ocp.CheckpointManager(root / "orbax", options=opts)
        self.step = 0

    def save(self, tree: Any) -> tuple[float, float]:
        self.step += 1
        t0 = time.perf_counter()
        self.mngr.save(self.step, args=self.ocp.args.StandardSave(tree))
        t1 = time.perf_counter()
        self.mngr.wait_until_finished()
        return t1 - t0, time.perf_counter() - t0

    def close(self) -> None:
        self.mngr.close()


def machine() -> dict[str, str]:
    import jax
    import orbax.checkpoint as ocp

    info = {"python": platform.python_version(), "jax": jax.__version__, "orbax": ocp.__version__,
            "backend": jax.default_backend(), "cores": str(os.cpu_count())}
    with open("/proc/meminfo") as f:
        info["ram_gib"] = f"{int(f.readline().split()[1]) / (1 << 20):.1f}"
    return info


def run(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    tree = make_tree(args.size_mb, args.arrays)
    contenders = [Lattice(root, tree), Orbax(root, tree)]
    samples: dict[str, list[float]] = {f"{c.name} {k}": [] for c in contenders for k in ("blocking", "committed")}
    try:
        for c in contenders:  # warm-up: buffers, threads, first-time setup
            c.save(tree)
        for rep in range(args.reps):
            order = contenders if rep % 2 == 0 else contenders[::-1]
            for c in order:
                settle(args.settle)
                blocking, committed = c.save(tree)
                samples[f"{c.name} blocking"].append(blocking)
                samples[f"{c.name} committed"].append(committed)
                print(f"rep {rep} {c.name}: blocking {blocking:.3f} s, committed {committed:.3f} s",
                      file=sys.stderr, flush=True)
    finally:
        for c in contenders:
            c.close()
    return samples


def report(samples: dict[str, list[float]], size: int, reps: int) -> str:
    med = {k: statistics.median(v) for k, v in samples.items()}
    gb = size / 1e9
    lines = ["| | lattice | orbax async | orbax / lattice |", "|---|---|---|---|"]
    for what in ("blocking", "committed"):
        lat, orb = med[f"lattice {what}"], med[f"orbax {what}"]
        lines.append(f"| {what} | {lat:.3f} s ({gb / lat:.2f} GB/s) | {orb:.3f} s ({gb / orb:.2f} GB/s) "
                     f"| {orb / lat:.2f}x |")
    return f"pytree {size / MiB:.0f} MiB; medians of {reps} reps\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", "--size-mib", dest="size_mb", type=int, default=1024,
                    help="pytree size in MiB (default 1024)")
    ap.add_argument("--arrays", type=int, default=64, help="number of float32 arrays (default 64)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per contender (default 5)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds of quiet (after sync) before each save")
    ap.add_argument("--dir", help="working directory (default: a temporary one next to the repository)")
    ap.add_argument("--json", help="write the samples and medians here")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    base = Path(args.dir) if args.dir else REPO.parent
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="lattice-bench-jax-", dir=base))
    try:
        print(f"pytree {args.size_mb} MiB in {args.arrays} float32 arrays, {args.reps} reps, in {root}",
              file=sys.stderr, flush=True)
        samples = run(args, root)
    finally:
        remove(root)
    size = args.size_mb * MiB // 4 // args.arrays * 4 * args.arrays
    info = machine()
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    print(report(samples, size, args.reps))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "samples": samples,
                                               "medians": {k: statistics.median(v) for k, v in samples.items()}},
                                              indent=1))


if __name__ == "__main__":
    main()
