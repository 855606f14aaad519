#!/usr/bin/env python
"""TensorFlow checkpoint benchmark: Lattice against ``tf.train.CheckpointManager.save``.

One process, one state: a ``tf.Module`` holding ``--tensors`` float32 variables of
``--size-mb`` MiB in all (default 64 variables, 1 GiB). Repetitions are interleaved (the order
rotates every repetition) and medians reported, with each anchor's time over Lattice's.

    .venv/bin/python bench/checkpoint_tf.py [--size-mb 1024] [--tensors 64] [--reps 3] [--dir DIR]

What is timed (all write to the same directory, keep one checkpoint, and end with data on disk):

- lattice: blocking = ``session.checkpoint()`` (the snapshot copy); commit = from that call until
  ``session.wait()`` returns (written with crc32c, fsynced, manifest, atomic rename).
- tf sync: ``CheckpointManager.save()`` (blocking = commit for the call), then ``fsync`` of the
  files it wrote (TensorFlow does not fsync): commit includes it.
- tf async: the same with ``CheckpointOptions(experimental_enable_async_checkpoint=True)``;
  blocking = ``save()``; commit = ``save()`` + ``checkpoint.sync()`` + the ``fsync``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import fsync_path, settle  # noqa: E402  (bench/checkpoint.py helpers)

MiB = 1 << 20


def make_module(size_mb: int, tensors: int) -> Any:
    import numpy as np
    import tensorflow as tf

    elems = size_mb * MiB // 4 // tensors
    module = tf.Module()
    rng = np.random.default_rng(0)
    module.vars = [tf.Variable(rng.standard_normal(elems, dtype=np.float32)) for _ in range(tensors)]
    return module


def machine() -> dict[str, str]:
    import platform

    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "cores": str(os.cpu_count())}


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


class Bench:
    """One contender per method; each returns (blocking seconds, commit seconds)."""

    def __init__(self, module: Any, root: Path):
        import tensorflow as tf

        import lattice

        self.root = root
        self.session = lattice.new_session(checkpoint_dir=str(root / "lattice"), keep=1, capture_rng=False,
                                           restore=False, every_steps=None)
        self.session.register({"module": module})
        self.tf_sync = tf.train.Checkpoint(module=module)
        self.tf_async = tf.train.Checkpoint(module=module)
        self.m_sync = tf.train.CheckpointManager(self.tf_sync, str(root / "tf-sync"), max_to_keep=1)
        self.m_async = tf.train.CheckpointManager(self.tf_async, str(root / "tf-async"), max_to_keep=1)
        self.async_options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)

    def lattice(self) -> tuple[float, float]:
        self.session.step += 1
        t0 = time.perf_counter()
        self.session.checkpoint()
        t1 = time.perf_counter()
        self.session.wait()
        return t1 - t0, time.perf_counter() - t0

    def tf(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.m_sync.save()
        t1 = time.perf_counter()
        fsync_tree(self.root / "tf-sync")
        return t1 - t0, time.perf_counter() - t0

    def tf_async_save(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.m_async.save(options=self.async_options)
        t1 = time.perf_counter()
        self.tf_async.sync()
        fsync_tree(self.root / "tf-async")
        return t1 - t0, time.perf_counter() - t0

    def close(self) -> None:
        self.session.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1024, help="state size in MiB (default 1024)")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed)")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = Path(tempfile.mkdtemp(prefix="lattice-bench-tf-", dir=args.dir))
    try:
        module = make_module(args.size_mb, args.tensors)
        bench = Bench(module, root)
        methods = {"lattice": bench.lattice, "tf.train.CheckpointManager.save": bench.tf,
                   "tf save (async checkpoint)": bench.tf_async_save}
        for fn in methods.values():  # warm-up: first-call allocations, tracing, directory creation
            fn()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        names = list(methods)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                settle(0.5)
                results[name].append(methods[name]())
        bench.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results, args, machine())


def report(results: dict[str, list[tuple[float, float]]], args: argparse.Namespace, host: dict[str, str]) -> None:
    med = {n: (statistics.median(b for b, _ in r), statistics.median(c for _, c in r)) for n, r in results.items()}
    base_block, base_commit = med["lattice"]
    print(f"state: tf.Module, {args.tensors} float32 variables, {args.size_mb} MiB; "
          f"medians of {args.reps} interleaved runs; {host}")
    print(f"{'method':34} {'blocking s':>11} {'x lattice':>10} {'commit s':>10} {'x lattice':>10} {'commit GB/s':>12}")
    for name, (block, commit) in med.items():
        gbs = args.size_mb * MiB / commit / 1e9
        print(f"{name:34} {block:11.3f} {block / base_block:10.1f} {commit:10.3f} {commit / base_commit:10.2f} {gbs:12.2f}")


if __name__ == "__main__":
    main()
