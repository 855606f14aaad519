#!/usr/bin/env python
"""Checkpoint-service benchmark: persist through the service against direct local-disk writes,
and a load test with many concurrent writers.

    .venv/bin/python bench/service.py [--size-mib 256] [--files 4] [--reps 5] [--writers 16]
                                      [--writer-steps 3] [--writer-mib 8] [--dir DIR] [--json OUT]

1. Persist (same run, same bytes, same disk, repetitions interleaved, medians reported):
   - direct: what a local Lattice persist does: each file written to a private temp directory
     with its crc32c computed and each block sent to the disk at once
     (``lattice.core.persist.Writeback``), fsynced; manifest written (temp, fsync, rename);
     directory fsynced and renamed to ``step-N`` (``lattice.core.storage.LocalDirectory``); the
     previous checkpoint deleted.
   - direct_plain: the same without the early writeback (write everything, then fsync), the
     plain way to write a file durably.
   - service (1 stream): what a Lattice persist to ``lattice://`` does: the same files written
     with their crc32c into a staging directory on /dev/shm (Lattice's default staging), then
     uploaded one after the other with Lattice's client (``ServiceStore.put_file``: sendfile
     from the page cache) and committed with the manifest; the service streams each body to
     disk with its own crc32c, fsyncs, and commits. Ratio = service throughput / direct.
   - service (N streams): the same, the files PUT over ``--files`` parallel connections (as the
     ranks of a job on several hosts do).
2. Load test: ``--writers`` concurrent writers (threads, one connection per request), each
   committing ``--writer-steps`` checkpoints of two files (``--writer-mib`` MiB + 4 KiB) to its
   own job with ``keep=1``; reports MB/s, requests/s and the number of errors (must be 0).

The service runs as a real subprocess (``lattice checkpoint-service serve``) on 127.0.0.1; the
data lives under ``--dir`` (default: a temporary directory, deleted at the end).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import crc32c

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lattice.core import fmt  # noqa: E402
from lattice.core.persist import Writeback  # noqa: E402
from lattice.core.storage import LocalDirectory, write_durable  # noqa: E402

MiB = 1 << 20
TOKEN = "bench-token"


def start_service(root: Path, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start the service on a free port; return the process and the port."""
    token = work / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    log = work / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lattice.cli", "checkpoint-service", "serve",
                                 "--root", str(root), "--port", "0", "--token-file", str(token)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if "listening on http://" in line:
                return proc, int(line.rsplit(":", 1)[1])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"service did not start:\n{log.read_text()}")


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> int:
    """One request on a fresh connection; returns the status (the body is read and dropped)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def make_files(size_mib: int, files: int) -> dict[str, bytes]:
    """``files`` files of random bytes totalling ``size_mib`` MiB (random, so nothing compresses)."""
    each = size_mib * MiB // files
    return {f"rank-{i}.safetensors": os.urandom(each) for i in range(files)}


def manifest(step: int, files: dict[str, bytes], crcs: dict[str, int]) -> bytes:
    info = {n: {"size": len(d), "crc32c": crcs[n]} for n, d in files.items()}
    return fmt.manifest(step, time.time(), info, {"bench": "python"})


def persist_direct(root: Path, step: int, files: dict[str, bytes], early_writeback: bool = True) -> None:
    """A local persist: write + crc32c + fsync each file, manifest, atomic rename, retention; with
    ``early_writeback`` each block goes to the disk at once, as Lattice's persist does."""
    local = LocalDirectory(root)
    local.prepare()
    tmp = local.new_tmp(step)
    crcs = {}
    for name, data in files.items():
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            crc, view, writeback = 0, memoryview(data), Writeback(fd)  # as lattice.core.persist writes
            for off in range(0, len(data), 4 * MiB):
                block = view[off:off + 4 * MiB]
                crc = crc32c.crc32c(block, crc)
                os.write(fd, block)
                if early_writeback:
                    writeback.wrote(off, off + len(block))
            os.fsync(fd)
        finally:
            os.close(fd)
        crcs[name] = crc
    write_durable(tmp / fmt.MANIFEST, manifest(step, files, crcs))
    local.commit(tmp, step)
    local.retain(1, step)


def persist_service(port: int, job: str, step: int, files: dict[str, bytes], streams: int, staging: Path) -> None:
    """Stage ``files`` (write + crc32c, on /dev/shm), upload them with Lattice's client over
    ``streams`` connections, then commit (retention keeps 1)."""
    from lattice.core.stores.service import ServiceStore

    store = ServiceStore(f"lattice://127.0.0.1:{port}/{job}", token=TOKEN)
    staging.mkdir(parents=True, exist_ok=True)
    crcs = {}
    for name, data in files.items():
        (staging / name).write_bytes(data)
        crcs[name] = crc32c.crc32c(data)

    def put(name: str) -> None:
        store.put_file(step, name, staging / name, len(files[name]), crcs[name])

    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(put, files))
    store.commit(step, manifest(step, files, crcs), keep=1)
    shutil.rmtree(staging, ignore_errors=True)


def bench_persist(args: argparse.Namespace, port: int, base: Path) -> dict[str, Any]:
    files = make_files(args.size_mib, args.files)
    total = sum(len(d) for d in files.values())
    runs: dict[str, list[float]] = {"direct": [], "direct_plain": [], "service_1": [], f"service_{args.files}": []}
    contenders = list(runs)
    staging = Path(tempfile.mkdtemp(prefix="lattice-bench-staging-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    for rep in range(args.reps):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for name in order:
            step = rep + 1
            t0 = time.perf_counter()
            if name.startswith("direct"):
                persist_direct(base / name, step, files, early_writeback=name == "direct")
            else:
                persist_service(port, name, step, files, 1 if name == "service_1" else args.files, staging)
            runs[name].append(total / MiB / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in runs.items()}
    # the shared disk drifts between repetitions: the ratio within each repetition is steadier
    services = [k for k in contenders if k.startswith("service")]
    paired = {f"{k} / {d}": statistics.median(s / b for s, b in zip(runs[k], runs[d], strict=True))
              for k in services for d in ("direct", "direct_plain")}
    return {"bytes": total, "mib_per_s_runs": runs, "mib_per_s_median": med,
            "ratio_of_medians": {f"{k} / {d}": med[k] / med[d] for k in services for d in ("direct", "direct_plain")},
            "median_paired_ratio": paired}


def bench_load(args: argparse.Namespace, port: int) -> dict[str, Any]:
    big, small = os.urandom(args.writer_mib * MiB), os.urandom(4096)
    files = {"data.safetensors": big, "tree.json": small}
    crcs = {n: crc32c.crc32c(d) for n, d in files.items()}
    latencies: list[float] = []
    errors: list[str] = []

    def writer(w: int) -> None:
        for step in range(1, args.writer_steps + 1):
            for name, data in files.items():
                t = time.perf_counter()
                try:
                    status = request(port, "PUT", f"/v1/jobs/load-{w}/checkpoints/{step}/files/{name}", data,
                                     {"X-Lattice-Crc32c": f"{crcs[name]:08x}", "Content-Length": str(len(data))})
                except OSError as exc:
                    status = repr(exc)
                latencies.append(time.perf_counter() - t)
                if status != 201:
                    errors.append(f"writer {w} step {step} {name}: {status}")
            t = time.perf_counter()
            status = request(port, "PUT", f"/v1/jobs/load-{w}/checkpoints/{step}/manifest?keep=1",
                             manifest(step, files, crcs))
            latencies.append(time.perf_counter() - t)
            if status != 201:
                errors.append(f"writer {w} step {step} commit: {status}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.writers) as pool:
        list(pool.map(writer, range(args.writers)))
    wall = time.perf_counter() - t0
    nbytes = args.writers * args.writer_steps * (len(big) + len(small))
    return {"writers": args.writers, "requests": len(latencies), "bytes": nbytes, "seconds": wall,
            "mb_per_s": nbytes / 1e6 / wall, "requests_per_s": len(latencies) / wall,
            "p50_latency_s": statistics.median(latencies),
            "max_latency_s": max(latencies), "errors": len(errors), "error_samples": errors[:5]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256, help="checkpoint size for the persist comparison")
    p.add_argument("--files", type=int, default=4, help="files per checkpoint (and parallel streams)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--writers", type=int, default=16)
    p.add_argument("--writer-steps", type=int, default=3)
    p.add_argument("--writer-mib", type=int, default=8)
    p.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lattice-bench-service-", dir=args.dir))
    proc, port = start_service(base / "service", base)
    try:
        persist = bench_persist(args, port, base)
        load = bench_load(args, port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)
    med = persist["mib_per_s_median"]
    print(f"persist {args.size_mib} MiB in {args.files} files, median of {args.reps} (MiB/s):")
    for name, value in med.items():
        print(f"  {name:12} {value:8.1f}   runs: {', '.join(f'{v:.0f}' for v in persist['mib_per_s_runs'][name])}")
    for k, ratio in persist["ratio_of_medians"].items():
        print(f"  {k}: ratio of medians {ratio:.2f}, median of per-repetition ratios "
              f"{persist['median_paired_ratio'][k]:.2f}  (target >= 0.7)")
    print(f"load: {load['writers']} writers, {load['requests']} requests in {load['seconds']:.1f} s: "
          f"{load['mb_per_s']:.0f} MB/s, {load['requests_per_s']:.1f} requests/s, "
          f"p50 {load['p50_latency_s'] * 1000:.0f} ms, max {load['max_latency_s'] * 1000:.0f} ms, "
          f"errors {load['errors']}")
    for e in load["error_samples"]:
        print(f"  error: {e}")
    if args.json:
        args.json.write_text(json.dumps({"persist": persist, "load": load}, indent=1))
    return 1 if load["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
