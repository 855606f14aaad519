#!/usr/bin/env python
"""Checkpoint benchmark: Lattice against a host copy, raw disk, torch.save, DCP and safetensors.

One process, one state (an ``nn.Module`` of ``--tensors`` float32 tensors, ``--size-mib`` in
all), repetitions interleaved (the order rotates every repetition) so that disk noise
spreads over every contender; medians are reported. Peak extra resident memory is measured
in a child process per scenario (``VmHWM`` from ``/proc/self/status``, reset through
``/proc/self/clear_refs`` once the state is allocated).

    .venv/bin/python bench/checkpoint.py [--size-mib 1024] [--tensors 64] [--reps 3]
                                         [--dir DIR] [--json OUT] [--no-memory]

What each contender does (all write to the same directory, all fsync their data):

- lattice blocking: ``session.checkpoint()`` until it returns (snapshot copy into the reused
  host buffer); lattice committed: from that call until ``session.wait()`` returns (data and
  tree written with crc32c, fsynced, manifest written and fsynced, directory renamed and
  fsynced, ``latest`` replaced, the previous checkpoint deleted: ``keep=1``).
- copy: ``dst.copy_(src)`` for every tensor into host tensors allocated (and touched) once.
- raw write: ``os.write`` of the copied bytes to one new file, then ``fsync``.
- torch.save: ``torch.save(state_dict, file)`` then ``flush`` + ``fsync``.
- DCP: ``torch.distributed.checkpoint.save(state_dict, checkpoint_id=dir, no_dist=True)``
  (its ``FileSystemWriter`` defaults: ``sync_files=True``, one thread, ``.metadata`` via
  tmp + fsync + rename).
- safetensors: ``safetensors.torch.save_file(state_dict, path)`` then ``fsync`` of the file.
- restore: a new Lattice session registering the same module (verified restore, read in
  place) against ``safetensors.torch.load_file`` plus ``copy_`` into the module's tensors.
  Warm: files in the page cache; cold: their pages dropped with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` first (``/proc/sys/vm/drop_caches`` needs more
  privilege than a container usually has).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


# -- state and helpers -------------------------------------------------------------------
def make_state(size_mib: int, tensors: int) -> Any:
    import torch

    elems = size_mib * MiB // 4 // tensors
    shape = (elems // 1024, 1024) if elems % 1024 == 0 else (elems,)

    class State(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            for i in range(tensors):
                self.register_parameter(f"t{i:03d}", torch.nn.Parameter(torch.rand(shape, generator=gen)))

    return State()


def state_dict(model: Any) -> dict[str, Any]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def nbytes(sd: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: Path) -> None:
    """Drop the (clean, already fsynced) page-cache pages of every file under ``path``."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(path: Path) -> float | None:
    """Fraction of ``path``'s bytes in the page cache (``fincore``), or None if unknown."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    res = size = 0
    for line in out.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def settle(seconds: float = 1.0) -> None:
    """Flush everything dirty and let the kernel's background work (writeback, freeing) finish."""
    os.sync()
    time.sleep(seconds)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


def byte_views(tensors: list[Any]) -> list[memoryview]:
    import torch

    return [memoryview(t.view(-1).view(torch.uint8).numpy()) for t in tensors]


# -- contenders ---------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, root: Path):
        import torch

        self.args, self.root = args, root
        self.model = make_state(args.size_mib, args.tensors)
        self.sd = state_dict(self.model)
        self.size = nbytes(self.sd)
        self.bufs = [torch.empty_like(t) for t in self.sd.values()]
        self.copy()  # touch the preallocated buffers once
        self.samples: dict[str, list[float]] = {}
        self.ckpt_dir = root / "lattice"
        import lattice

        self.session = lattice.new_session(checkpoint_dir=self.ckpt_dir, every_steps=None, keep=1)
        self.session.register({"model": self.model})
        self.n = 0

    def record(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    # save side
    def copy(self) -> float:
        t0 = time.perf_counter()
        for dst, src in zip(self.bufs, self.sd.values(), strict=True):
            dst.copy_(src)
        return time.perf_counter() - t0

    def lattice_checkpoint(self) -> tuple[float, float]:
        self.n += 1
        self.session.step = self.n
        committed: list[float] = []
        t0 = time.perf_counter()
        future = self.session.checkpoint()
        t1 = time.perf_counter()
        future.add_done_callback(lambda f: committed.append(time.perf_counter()))  # the commit (or now)
        self.session.wait()  # also waits for the deletion of the previous checkpoint
        t2 = time.perf_counter()
        self.record("lattice_retired", t2 - t0)
        return t1 - t0, committed[0] - t0

    def raw_write(self) -> float:
        path = self.root / "raw.bin"
        views = byte_views(self.bufs)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for v in views:
                _write_all(fd, v)
            os.fsync(fd)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
        remove(path)
        return dt

    def torch_save(self) -> float:
        import torch

        path = self.root / "torch.pt"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(self.sd, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        remove(path)
        return dt

    def dcp_save(self) -> float:
        import torch.distributed.checkpoint as dcp

        path = self.root / "dcp"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(self.sd, checkpoint_id=str(path), no_dist=True)
        dt = time.perf_counter() - t0
        remove(path)
        return dt

    def st_save(self, keep: bool = False) -> float:
        from safetensors.torch import save_file

        path = self.root / "st.safetensors"
        t0 = time.perf_counter()
        save_file(self.sd, str(path))
        fsync_path(path)
        dt = time.perf_counter() - t0
        if not keep:
            remove(path)
        return dt

    # restore side
    def lattice_restore(self, cold: bool) -> float:
        import lattice

        latest = self.session.storage.committed()[0][1]
        if cold:
            drop_cache(latest)
            self.record("cached_fraction_lattice_cold", cached_fraction(latest) or 0.0)
        sess = lattice.new_session(checkpoint_dir=self.ckpt_dir, every_steps=None, keep=1)
        t0 = time.perf_counter()
        sess.register({"model": self.model})
        dt = time.perf_counter() - t0
        if sess.restored is None or sess.restored.step != self.n:
            raise RuntimeError(f"lattice restored {sess.restored}, expected step {self.n}")
        sess.close()
        return dt

    def st_restore(self, cold: bool) -> float:
        import torch
        from safetensors.torch import load_file

        path = self.root / "st.safetensors"
        if cold:
            drop_cache(path)
            self.record("cached_fraction_st_cold", cached_fraction(path) or 0.0)
        t0 = time.perf_counter()
        loaded = load_file(str(path))
        with torch.no_grad():
            for k, t in self.sd.items():
                t.copy_(loaded[k])
        del loaded
        return time.perf_counter() - t0

    def raw_read(self, cold: bool) -> float:
        """Read the lattice data file into the preallocated buffers (the disk/page-cache floor)."""
        import lattice.core.fmt as fmt

        path = self.session.storage.committed()[0][1] / fmt.DATA
        if cold:
            drop_cache(path)
        views = byte_views(self.bufs)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.seek(8 + int.from_bytes(f.read(8), "little"))  # skip the safetensors header
            for v in views:
                while len(v):
                    v = v[f.readinto(v):]
        return time.perf_counter() - t0

    # the run
    def run(self) -> None:
        reps, log = self.args.reps, self.log
        blocking, committed = self.lattice_checkpoint()
        self.record("lattice_first_blocking", blocking)
        self.record("lattice_first_committed", committed)
        log(f"first checkpoint: blocking {blocking:.3f}s, committed {committed:.3f}s")
        save: list[tuple[str, Any]] = [
            ("lattice", None),  # paired with "copy", right before or after it
            ("raw_write", self.raw_write),
            ("torch_save", self.torch_save),
            ("dcp_save", self.dcp_save),
            ("st_save", self.st_save),
        ]
        if self.args.only:
            save = [(n, f) for n, f in save if n in self.args.only.split(",")]
        for r in range(reps):
            for name, fn in save[r % len(save):] + save[:r % len(save)]:
                settle()
                if fn is None:
                    if r % 2:
                        self.record("copy", self.copy())
                    b, c = self.lattice_checkpoint()
                    if not r % 2:
                        settle()
                        self.record("copy", self.copy())
                    self.record("lattice_blocking", b)
                    self.record("lattice_committed", c)
                    log(f"rep {r + 1}/{reps} lattice: blocking {b:.3f}s, committed {c:.3f}s; "
                        f"copy {self.samples['copy'][-1]:.3f}s")
                else:
                    dt = fn()
                    self.record(name, dt)
                    log(f"rep {r + 1}/{reps} {name}: {dt:.3f}s")
                gc.collect()
        if self.args.no_restore:
            return
        self.st_save(keep=True)  # the safetensors file for the restore anchor
        restore = [
            ("lattice_restore", self.lattice_restore),
            ("st_restore", self.st_restore),
            ("raw_read", self.raw_read),
        ]
        for cold in (False, True):
            tag = "cold" if cold else "warm"
            if not cold:  # bring both files into the page cache
                self.lattice_restore(False)
                self.st_restore(False)
            for r in range(reps):
                for name, fn in restore[r % 3:] + restore[:r % 3]:
                    settle()
                    dt = fn(cold)
                    self.record(f"{name}_{tag}", dt)
                    log(f"rep {r + 1}/{reps} {name} ({tag}): {dt:.3f}s")
                    gc.collect()

    def log(self, msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)


# -- peak memory (child processes) ----------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    """Run one scenario once and print its peak extra RSS (bytes over the allocated state) as JSON."""
    import torch
    from safetensors.torch import load_file, save_file

    import lattice

    model = make_state(args.size_mib, args.tensors)
    sd = state_dict(model)
    work = Path(args.dir)
    scenario = args.child
    gc.collect()
    base = _status("VmRSS")
    if not _reset_peak():
        raise SystemExit("cannot reset VmHWM through /proc/self/clear_refs")
    out: dict[str, Any] = {"scenario": scenario, "base_rss": base}
    if scenario == "lattice_checkpoint":
        sess = lattice.new_session(checkpoint_dir=work / "lattice-mem", every_steps=None, keep=1)
        sess.register({"model": model})
        for step in (1, 2):
            sess.step = step
            sess.checkpoint()
            sess.wait()
            out[f"peak_after_{step}"] = _status("VmHWM") - base
        out["peak_extra"] = out["peak_after_2"]
        sess.close()
        remove(work / "lattice-mem")
    elif scenario == "lattice_restore":
        sess = lattice.new_session(checkpoint_dir=work / "lattice", every_steps=None, keep=1)
        sess.register({"model": model})
        if sess.restored is None:
            raise SystemExit("nothing restored")
        out["peak_extra"] = _status("VmHWM") - base
    elif scenario == "torch_save":
        with open(work / "mem.pt", "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        out["peak_extra"] = _status("VmHWM") - base
        remove(work / "mem.pt")
    elif scenario == "dcp_save":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(work / "mem-dcp"), no_dist=True)
        out["peak_extra"] = _status("VmHWM") - base
        remove(work / "mem-dcp")
    elif scenario == "st_save":
        save_file(sd, str(work / "mem.safetensors"))
        fsync_path(work / "mem.safetensors")
        out["peak_extra"] = _status("VmHWM") - base
        remove(work / "mem.safetensors")
    elif scenario == "st_restore":
        loaded = load_file(str(work / "st.safetensors"))
        with torch.no_grad():
            for k, t in sd.items():
                t.copy_(loaded[k])
        del loaded
        out["peak_extra"] = _status("VmHWM") - base
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out))


def memory(args: argparse.Namespace, root: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for scenario in ("lattice_checkpoint", "lattice_restore", "torch_save", "dcp_save", "st_save", "st_restore"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", scenario, "--size-mib", str(args.size_mib),
               "--tensors", str(args.tensors), "--dir", str(root)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory scenario {scenario} failed:\n{proc.stderr[-3000:]}")
        results[scenario] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {scenario}: peak extra RSS {results[scenario]['peak_extra'] / MiB:.0f} MiB",
              file=sys.stderr, flush=True)
    return results


# -- report --------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    info = {"python": platform.python_version(), "kernel": platform.release()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = str(torch.get_num_threads())
        import safetensors

        info["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info["cores"] = str(os.cpu_count())
    with open("/proc/meminfo") as f:
        info["ram_gib"] = f"{int(f.readline().split()[1]) / (1 << 20):.1f}"
    return info


def table(s: dict[str, list[float]], mem: dict[str, dict[str, Any]] | None, size: int) -> tuple[str, list[dict]]:
    med = {k: statistics.median(v) for k, v in s.items()}
    gb = size / 1e9

    def t(x: float) -> str:
        return f"{x:.3f} s ({gb / x:.2f} GB/s)"

    rows: list[dict[str, Any]] = []

    def row(metric: str, lat: float, anchor_name: str, anc: float, ratio: float, target: str,
            ok: bool | None, fmt_lat: str | None = None, fmt_anc: str | None = None) -> None:
        rows.append({"metric": metric, "lattice": lat, "anchor_name": anchor_name, "anchor": anc,
                     "ratio": ratio, "target": target, "pass": ok,
                     "cells": [metric, fmt_lat or t(lat), f"{anchor_name}: {fmt_anc or t(anc)}", f"{ratio:.2f}x",
                               target, "-" if ok is None else ("PASS" if ok else "FAIL")]})

    lb, cp = med["lattice_blocking"], med["copy"]
    row("blocking, steady state", lb, "copy into preallocated host tensors", cp, lb / cp, "<= 1.5x", lb / cp <= 1.5)
    fb = med["lattice_first_blocking"]
    row("blocking, first checkpoint (allocates the buffer)", fb, "copy into preallocated host tensors", cp, fb / cp,
        "(info)", None)
    lc = med["lattice_committed"]
    rw = med["raw_write"]
    row("time to committed: bandwidth vs raw", lc, "raw write+fsync", rw, rw / lc, ">= 0.9x bandwidth", rw / lc >= 0.9)
    for key, name in (("torch_save", "torch.save+fsync"), ("dcp_save", "DCP save"),
                      ("st_save", "safetensors save_file+fsync")):
        row("time to committed", lc, name, med[key], lc / med[key], "< 1.0x", lc < med[key])
    fc = med["lattice_first_committed"]
    row("time to committed, first checkpoint", fc, "raw write+fsync", rw, fc / rw, "(info)", None)
    for tag in ("warm", "cold"):
        lr, sr = med[f"lattice_restore_{tag}"], med[f"st_restore_{tag}"]
        row(f"restore into the module ({tag})", lr, "safetensors load_file + copy_", sr, lr / sr, "<= 1.0x", lr <= sr)
        rr = med[f"raw_read_{tag}"]
        row(f"restore ({tag}) vs raw read", lr, "raw readinto of the data file", rr, lr / rr, "(info)", None)
    if mem:
        for key, label in (("lattice_checkpoint", "checkpoint (first + steady)"), ("lattice_restore", "restore")):
            extra = mem[key]["peak_extra"]
            row(f"peak extra RSS, {label}", extra, "state size", size, extra / size, "<= 1.1x", extra / size <= 1.1,
                f"{extra / MiB:.0f} MiB", f"{size / MiB:.0f} MiB")
        for key, label in (("torch_save", "torch.save+fsync"), ("dcp_save", "DCP save"),
                           ("st_save", "safetensors save_file+fsync"), ("st_restore", "safetensors load_file + copy_")):
            extra = mem[key]["peak_extra"]
            row(f"peak extra RSS, {label} (anchor)", extra, "state size", size, extra / size, "(info)", None,
                f"{extra / MiB:.0f} MiB", f"{size / MiB:.0f} MiB")
    head = ["metric", "lattice", "anchor", "ratio", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r["cells"]) + " |" for r in rows]
    return "\n".join(lines), rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("jax", "tf"):  # the JAX (orbax) and TensorFlow cases
        import runpy

        name = sys.argv.pop(1)
        sys.argv[0] = str(Path(__file__).with_name(f"checkpoint_{name}.py"))
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="bench/checkpoint.py jax|tf [options]: the JAX case (orbax "
                                        "CheckpointManager) or the TensorFlow case (tf.train.CheckpointManager)")
    ap.add_argument("--size-mib", type=int, default=1024, help="state size in MiB (default 1024)")
    ap.add_argument("--tensors", type=int, default=64, help="number of float32 tensors (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per contender, >= 3 (default 3)")
    ap.add_argument("--dir", help="working directory (default: a temporary one next to the repository)")
    ap.add_argument("--json", help="write every sample, the medians and the table here")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--only", help="comma-separated save contenders (lattice,raw_write,torch_save,dcp_save,st_save)")
    ap.add_argument("--no-restore", action="store_true", help="skip the restore contenders")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    base = Path(args.dir) if args.dir else REPO.parent
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="lattice-bench-", dir=base))
    started = datetime.datetime.now(datetime.UTC)
    try:
        print(f"state {args.size_mib} MiB in {args.tensors} float32 tensors, {args.reps} reps, in {root}",
              file=sys.stderr, flush=True)
        bench = Bench(args, root)
        bench.run()
        samples, size = bench.samples, bench.size
        mem = None
        if not args.no_memory:
            bench.session.close()
            del bench
            gc.collect()
            mem = memory(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.only or args.no_restore:  # a partial run: no table, the medians and samples only
        for k, v in samples.items():
            print(f"{k:32s} median {statistics.median(v):.3f}  " + " ".join(f"{x:.2f}" for x in v))
        return
    text, rows = table(samples, mem, size)
    info = machine()
    print(f"\n{datetime.date.today()}  " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"state: {size / MiB:.0f} MiB float32 in {args.tensors} tensors; medians of {args.reps} reps\n")
    print(text)
    if args.json:
        doc = {"started": started.isoformat(), "machine": info, "args": {k: v for k, v in vars(args).items()
                                                                        if k != "child"},
               "state_bytes": size, "samples": samples,
               "medians": {k: statistics.median(v) for k, v in samples.items()}, "memory": mem,
               "rows": [{k: v for k, v in r.items() if k != "cells"} for r in rows], "table": text}
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
