"""The operator publishes edited limits once per job and spec generation; a job deleted and
recreated under the same name starts again at generation 1 and must not be mistaken for the old
one (the cache is keyed by the job's uid too). A real embedded KV server holds the round document."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from lattice_operator import limits

from lattice.runtime.kv import create_backend
from lattice.runtime.kv.server import start_server
from lattice.runtime.rendezvous.decide import RoundState

pytestmark = pytest.mark.timeout(30)


def spec(url: str, uid: str, generation: int, lo: int, hi: int) -> Any:
    return SimpleNamespace(namespace="ns", name="job", uid=uid, generation=generation, min_size=lo, max_size=hi,
                           rendezvous=SimpleNamespace(backend="embedded", endpoint=url))


def pods_of(generation: int) -> list[dict[str, Any]]:
    env = [{"name": "LATTICE_SPEC_GENERATION", "value": str(generation)}]
    return [{"spec": {"containers": [{"name": "worker", "env": env}]}}]


def test_a_recreated_job_of_the_same_name_gets_its_limits_published() -> None:
    server = start_server("127.0.0.1", 0)
    store = create_backend("embedded", url=server.url)
    limits._published.clear()
    key = "lattice/job/state"
    try:
        store.cas(key, RoundState(round=1).to_json(), 0)
        first = limits.publish_if_stale(spec(server.url, "uid-1", 3, 1, 4), pods_of(1))
        assert first is not None
        first.join(10)
        assert RoundState.from_json(store.get(key).value).sizes == (3, 1, 4)
        assert limits.publish_if_stale(spec(server.url, "uid-1", 3, 1, 4), pods_of(1)) is None  # done already

        store.delete(key)  # the job is deleted; its namesake starts a fresh round document
        store.cas(key, RoundState(round=1).to_json(), 0)
        second = limits.publish_if_stale(spec(server.url, "uid-2", 2, 2, 5), pods_of(1))
        assert second is not None  # not mistaken for the old job's generation 3
        second.join(10)
        assert RoundState.from_json(store.get(key).value).sizes == (2, 2, 5)
    finally:
        limits._published.clear()
        store.close()
        server.stop()
