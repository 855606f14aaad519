"""Rendezvous benchmark: time for N agents to complete a round, and store requests per agent.

Each agent is a thread with its own store client and session (``RendezvousHandler`` with
``min = max = N``, so the round closes as soon as everyone is in). Requests are counted
in the client layer (a counting ``KVStore`` wrapper) from the agent's first request until
its ``join`` returns. Runs on the embedded server and, when the ``etcd`` binary exists,
on a real etcd started on free ports.

    .venv/bin/python bench/rendezvous.py [--sizes 8,32,128] [--repeat 3] [--stagger 1.0]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lattice.runtime.kv import KVStore, create_backend
from lattice.runtime.kv.server import start_server
from lattice.runtime.rendezvous.decide import Limits
from lattice.runtime.rendezvous.handler import RendezvousHandler


class CountingKV(KVStore):
    """Delegate every call to ``inner`` and count the calls per method."""

    def __init__(self, inner: KVStore) -> None:
        self.inner = inner
        self.counts: collections.Counter[str] = collections.Counter()

    def get(self, key: str) -> Any:
        self.counts["get"] += 1
        return self.inner.get(key)

    def put(self, key: str, value: bytes, *, session: str | None = None) -> int:
        self.counts["put"] += 1
        return self.inner.put(key, value, session=session)

    def cas(self, key: str, value: bytes, index: int, *, session: str | None = None) -> int:
        self.counts["cas"] += 1
        return self.inner.cas(key, value, index, session=session)

    def delete(self, key: str, *, index: int | None = None) -> None:
        self.counts["delete"] += 1
        self.inner.delete(key, index=index)

    def delete_prefix(self, prefix: str) -> None:
        self.counts["delete_prefix"] += 1
        self.inner.delete_prefix(prefix)

    def list(self, prefix: str) -> Any:
        self.counts["list"] += 1
        return self.inner.list(prefix)

    def wait(self, prefix: str, index: int, timeout: float) -> Any:
        self.counts["wait"] += 1
        return self.inner.wait(prefix, index, timeout)

    def create_session(self, ttl: float, *, name: str = "lattice") -> Any:
        self.counts["create_session"] += 1
        return self.inner.create_session(ttl, name=name)

    def renew_session(self, session_id: str) -> float:
        self.counts["renew_session"] += 1
        return self.inner.renew_session(session_id)

    def destroy_session(self, session_id: str) -> None:
        self.counts["destroy_session"] += 1
        self.inner.destroy_session(session_id)

    def close(self) -> None:
        self.inner.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def etcd_server() -> Iterator[str | None]:
    """A throwaway single-node etcd on free ports, or None when the binary is missing."""
    if shutil.which("etcd") is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as root:
        url, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
        proc = subprocess.Popen(
            ["etcd", "--name", "bench", "--data-dir", f"{root}/data", "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"bench={peer}",
             "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                        if b"true" in resp.read():
                            break
                except OSError:
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def one_round(backend: str, url: str, n: int, ttl: float, stagger: float) -> dict[str, float]:
    """Join ``n`` agents once, arriving evenly over ``stagger`` seconds; return seconds
    (from the last arrival until every agent's ``join`` returned) and request counts."""
    job = f"bench-{uuid.uuid4().hex[:8]}"
    stores = [CountingKV(create_backend(backend, url=url)) for _ in range(n)]
    hs = [RendezvousHandler(s, job, f"node{i:03d}", Limits(n, n, last_call=1.0), ttl=ttl)
          for i, s in enumerate(stores)]
    barrier = threading.Barrier(n + 1)
    done: list[float] = [0.0] * n
    per_agent: list[collections.Counter[str]] = [collections.Counter()] * n

    def agent(i: int) -> None:
        barrier.wait()
        time.sleep(stagger * i / max(n - 1, 1))
        hs[i].join(60)
        done[i] = time.perf_counter()
        per_agent[i] = collections.Counter(stores[i].counts)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = max(done) - t0 - stagger
    for h in hs:
        h.leave()
    for s in stores:
        s.close()
    totals = [sum(c.values()) - c["renew_session"] for c in per_agent]
    writes = sum(c["cas"] for c in per_agent)
    return {"seconds": seconds, "mean": statistics.mean(totals), "max": max(totals),
            "cas": writes / n, "wait": sum(c["wait"] for c in per_agent) / n}


def run(backend: str, url: str, sizes: list[int], repeat: int, ttl: float,
        stagger: float) -> list[list[str]]:
    rows = []
    for n in sizes:
        runs = [one_round(backend, url, n, ttl, stagger) for _ in range(repeat)]
        best = min(runs, key=lambda r: r["seconds"])
        rows.append([backend if backend != "consul" else "embedded", f"{stagger:g}", str(n),
                     f"{best['seconds']:.3f}", f"{statistics.median(r['seconds'] for r in runs):.3f}",
                     f"{statistics.mean(r['mean'] for r in runs):.1f}",
                     f"{max(r['max'] for r in runs):.0f}",
                     f"{statistics.mean(r['cas'] for r in runs):.2f}",
                     f"{statistics.mean(r['wait'] for r in runs):.2f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,32,128")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--stagger", type=float, default=1.0,
                   help="second scenario: arrivals spread evenly over this many seconds")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    server = start_server(min_session_ttl=1.0)
    try:
        for stagger in (0.0, args.stagger):
            rows += run("consul", server.url, sizes, args.repeat, 10.0, stagger)
    finally:
        server.stop()
    with etcd_server() as url:
        if url is None:
            print("etcd binary not found: etcd rows skipped")
        else:
            for stagger in (0.0, args.stagger):
                rows += run("etcd", url, sizes, args.repeat, 10.0, stagger)
    head = ["store", "arrivals s", "agents", "best s", "median s", "req/agent", "max req", "cas/agent",
            "wait/agent"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    print("arrivals s: agents start evenly over this time (0: all at once); best/median s: from the "
          "last arrival until every join() returned;\nreq/agent: store requests from the agent's "
          "first until its join() returns (renewals excluded), mean over agents.\n"
          "Target: 128 agents <= 2 s on embedded; req/agent flat in N.")


if __name__ == "__main__":
    main()
