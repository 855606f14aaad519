"""Helpers for the rendezvous handler tests (imported by name: tests/runtime is on sys.path)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from lattice.runtime.kv import KVStore, create_backend
from lattice.runtime.rendezvous.api import Assignment
from lattice.runtime.rendezvous.decide import Limits
from lattice.runtime.rendezvous.handler import RendezvousHandler


@dataclass
class RdzvEnv:
    """A store to run rendezvous against.

    Attributes:
        name: the test id (``embedded`` or ``etcd``).
        backend: the backend to create (``consul`` speaks to the embedded server).
        url: the server URL.
        ttl: session TTL for agents (the server's shortest useful one).
        lapse: how long after the last renewal a session lapses (Consul: 2 x TTL; etcd: TTL).
        server: the embedded server handle (None for etcd).
    """

    name: str
    backend: str
    url: str
    ttl: float
    lapse: float
    server: Any = None
    job: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:10]}")
    stores: list[KVStore] = field(default_factory=list)
    handlers: list[RendezvousHandler] = field(default_factory=list)

    def store(self) -> KVStore:
        kv = create_backend(self.backend, url=self.url)
        self.stores.append(kv)
        return kv

    def handler(self, node: str, limits: Limits, **kw: Any) -> RendezvousHandler:
        kw.setdefault("ttl", self.ttl)
        h = RendezvousHandler(self.store(), self.job, node, limits, **kw)
        self.handlers.append(h)
        return h

    def close(self) -> None:
        for h in self.handlers:
            try:
                h.leave()
            except Exception:  # noqa: BLE001 - best-effort cleanup (store may be gone)
                pass
        for kv in self.stores:
            kv.close()


def join_all(handlers: list[RendezvousHandler], timeout: float) -> dict[str, Assignment]:
    """Join every handler on its own thread; return node -> assignment (re-raise the first error)."""
    results: dict[str, Assignment] = {}
    errors: list[BaseException] = []

    def run(h: RendezvousHandler) -> None:
        try:
            results[h.member.node] = h.join(timeout)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(h,), daemon=True) for h in handlers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if errors:
        raise errors[0]
    assert len(results) == len(handlers), f"only {sorted(results)} joined"
    return results


def check_round(results: dict[str, Assignment]) -> Assignment:
    """Assert one round, one master, contiguous unique ranks; return any assignment."""
    first = next(iter(results.values()))
    assert {a.round for a in results.values()} == {first.round}
    assert {a.members for a in results.values()} == {first.members}
    assert sorted(a.rank for a in results.values()) == list(range(len(results)))
    assert all(a.world == len(results) for a in results.values())
    assert all(first.members[a.rank].node == node for node, a in results.items())
    return first
