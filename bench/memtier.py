#!/usr/bin/env python
"""Memory-tier restore against storage-tier restore of the same state, in one run (issue 6).

One process, one numpy state (``--size-mb`` in ``--arrays`` float32 arrays, default 1 GiB). One
checkpoint is committed into a memory dir on /dev/shm (as a worker under the agent does) and
uploaded to a storage directory on disk with ``transfer.upload`` (as the agent's replicator
does). Then, ``--reps`` times, interleaved:

- memory: a new session with ``checkpoint_dir=<storage>`` and ``LATTICE_MEMORY_DIR=<memory dir>``
  (the environment a restarted worker gets from the agent) registers the same arrays; the restore
  must come from the memory dir (checked through ``restored_from``). The checkpoint was uploaded,
  so the agent marked it verified (every file checked by the upload) and the restore copies it
  without checksumming it again;
- memory_unverified: the same, with the marker moved aside: a worker that crashed before the
  agent's upload of its newest checkpoint finished, so every byte is checksummed;
- storage, cold: the same without ``LATTICE_MEMORY_DIR`` after dropping the storage files from
  the page cache (``/proc/sys/vm/drop_caches`` when writable, i.e. as root on a VM, else
  ``posix_fadvise(DONTNEED)`` on each file); the restore must come from storage;
- storage, warm: the same with the files still cached (the best case for storage);
- service, cold (``--service``): storage is the checkpoint service (``lattice checkpoint-service
  serve`` started here on 127.0.0.1, its root on the same disk, caches dropped): the restore lists
  and downloads over HTTP into a staging directory on the memory root, as Lattice stages by default
  (emptied before each run), and restores from it.

Every restore but the agent-verified memory one verifies every byte's crc32c; all read into the
registered arrays in place. Medians are reported, with ratios.

    .venv/bin/python bench/memtier.py [--size-mb 1024] [--arrays 16] [--reps 5] [--service]
                                      [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from service import TOKEN, _exit_on_sigterm, start_service  # noqa: E402  (bench/service.py)

from lattice.core.stores.tiers import fs_type  # noqa: E402

MiB = 1 << 20


def drop_cache(root: Path) -> str:
    """Drop ``root``'s files from the page cache; returns how (tmpfs pages are not affected)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for p in root.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


def make_state(size_mb: int, arrays: int) -> dict[str, Any]:
    import numpy as np

    n = size_mb * MiB // 4 // arrays
    rng = np.random.default_rng(0)
    return {f"a{i}": rng.standard_normal(n, dtype=np.float32) for i in range(arrays)}


def restore(state: dict[str, Any], storage: str, memory: Path | None) -> tuple[float, str]:
    """One restore as a restarted worker does it; returns (seconds, the checkpoint it came from)."""
    import lattice

    if memory is None:
        os.environ.pop("LATTICE_MEMORY_DIR", None)
    else:
        os.environ["LATTICE_MEMORY_DIR"] = str(memory)
    try:
        t0 = time.perf_counter()
        s = lattice.new_session(checkpoint_dir=storage, every_steps=None, capture_rng=False)
        s.register(dict(state))
        dt = time.perf_counter() - t0
        where = str(s.restored.path) if s.restored else "nothing"
        s.close()
    finally:
        os.environ.pop("LATTICE_MEMORY_DIR", None)
    return dt, where


def upload(memory: Path, url: str, mark: bool = False) -> float:
    """Upload the memory checkpoint to ``url`` as the agent's replicator does (``MemoryTier._upload``:
    the upload checks every file, then, with ``mark``, the checkpoint is marked verified); seconds."""
    from lattice.core.stores import open_store, tiers, transfer

    t0 = time.perf_counter()
    transfer.upload(memory / "step-0000000001", open_store(url), 1)
    if mark:
        tiers.mark_verified(memory, 1, memory / "step-0000000001")
    return time.perf_counter() - t0


def prepare(state: dict[str, Any], memory: Path, storage: Path) -> dict[str, float]:
    """Commit one checkpoint into memory (timed) and upload it to storage as the agent does (timed)."""
    import lattice

    s = lattice.new_session(checkpoint_dir=str(memory), every_steps=None, capture_rng=False)
    s.register(dict(state))
    s.step = 1
    t0 = time.perf_counter()
    s.checkpoint()
    blocking = time.perf_counter() - t0
    s.wait()
    committed = time.perf_counter() - t0
    s.close()
    return {"memory_blocking_s": blocking, "memory_committed_s": committed, "upload_s": upload(memory, str(storage), mark=True)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lattice-bench-memtier-"))
    storage = base / "storage"
    memory = Path(args.shm) / f"lattice-bench-{uuid.uuid4().hex[:8]}"
    state = make_state(args.size_mb, args.arrays)
    size = sum(a.nbytes for a in state.values())
    service, staging = None, None
    try:
        memory.mkdir()
        prep = prepare(state, memory, storage)
        # contender: (checkpoint_dir, memory dir or None, drop caches first, where the restore must come from)
        plan: dict[str, tuple[str, Path | None, bool, Path]] = {
            "memory": (str(storage), memory, False, memory),
            "memory_unverified": (str(storage), memory, False, memory),
            "storage_cold": (str(storage), None, True, storage),
            "storage_warm": (str(storage), None, False, storage)}
        if args.service:
            service, port = start_service(base / "service", base)
            os.environ["LATTICE_SERVICE_TOKEN"] = TOKEN
            url = f"lattice://127.0.0.1:{port}/bench"
            prep["service_upload_s"] = upload(memory, url)
            staging = Path(args.shm) / f"lattice-bench-staging-{uuid.uuid4().hex[:8]}"  # where Lattice stages
            os.environ["LATTICE_STAGING_DIR"] = str(staging)  # by default: /dev/shm, when it has room
            plan["service_cold"] = (url, None, True, staging)
        times, how = measure(plan, state, args.reps, base)
    finally:
        shutil.rmtree(memory, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if service is not None:
            service.terminate()
            service.wait(30)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"size_bytes": size, "reps": args.reps, "cache_drop": how, "storage_fs": fs_type(base),
            "memory_fs": fs_type(Path(args.shm)), "prepare": prep, "times": times, "median_s": med,
            "speedup": {k: med[k] / med["memory"] for k in med if k != "memory"},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                        "load": os.getloadavg()}}


def measure(plan: dict[str, tuple[str, Path | None, bool, Path]], state: dict[str, Any], reps: int,
            base: Path) -> tuple[dict[str, list[float]], str]:
    """``reps`` restores per contender, the order rotating every repetition."""
    from lattice.core.stores.tiers import VERIFIED

    times: dict[str, list[float]] = {k: [] for k in plan}
    names, how = list(plan), ""
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            url, mem, cold, expected = plan[name]
            if "service_cold" in plan:  # a service restore downloads every time
                shutil.rmtree(plan["service_cold"][3], ignore_errors=True)
            if cold:
                how = drop_cache(base)
            elif name.endswith("_warm"):  # a cold contender may have just dropped the cache: read it back in
                for f in expected.rglob("*"):
                    if f.is_file():
                        f.read_bytes()
            marker = mem / f"{VERIFIED}1" if mem is not None else None
            if name == "memory_unverified":
                marker.rename(marker.with_name("aside"))  # type: ignore[union-attr]
            try:
                dt, where = restore(state, url, mem)
            finally:
                if name == "memory_unverified":
                    marker.with_name("aside").rename(marker)  # type: ignore[union-attr]
            if not where.startswith(str(expected) + "/"):
                raise RuntimeError(f"{name} restore came from {where}, expected under {expected}")
            times[name].append(dt)
        print(f"rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    return times, how


def report(res: dict[str, Any]) -> None:
    gib = res["size_bytes"] / (1 << 30)
    med = res["median_s"]
    print(f"\nstate {res['size_bytes'] / MiB:.0f} MiB; memory on {res['memory_fs']}, storage on {res['storage_fs']}; "
          f"cold = {res['cache_drop']}; medians of {res['reps']}")
    print(f"{'restore':16} {'median s':>9} {'GiB/s':>7}")
    for k in med:
        print(f"{k:16} {med[k]:9.3f} {gib / med[k]:7.2f}")
    for k, ratio in res["speedup"].items():
        print(f"memory vs {k}: {ratio:.1f}x faster" + ("  (target >= 10x)" if k.endswith("cold") else ""))
    if "memory_unverified" in med:
        print(f"memory_unverified vs service_cold: {med.get('service_cold', float('nan')) / med['memory_unverified']:.1f}x, "
              f"vs storage_cold: {med['storage_cold'] / med['memory_unverified']:.1f}x")
    p = res["prepare"]
    print(f"checkpoint into memory: blocking {p['memory_blocking_s']:.3f}s, committed {p['memory_committed_s']:.3f}s; "
          f"agent upload to disk {p['upload_s']:.3f}s ({gib / p['upload_s']:.2f} GiB/s)"
          + (f", to the service {p['service_upload_s']:.3f}s" if "service_upload_s" in p else ""))
    print(f"load average during the run: {res['machine']['load']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="state size in MiB (default 1024)")
    ap.add_argument("--arrays", type=int, default=16, help="number of float32 arrays (default 16)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per contender (default 5)")
    ap.add_argument("--service", action="store_true", help="also restore through the checkpoint service")
    ap.add_argument("--dir", default=None, help="storage directory's parent (default: a temp dir, on disk here)")
    ap.add_argument("--shm", default="/dev/shm", help="memory root (default /dev/shm)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the finally blocks stop the service, free /dev/shm
    res = run(args)
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
