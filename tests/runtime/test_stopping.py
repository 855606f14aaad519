"""The planned-stop agreement (lattice/runtime/agent/stopping.py) against the embedded KV server:
the final step is the maximum of every agent's proposal, workers are held until it is final,
and a member that never acknowledges yields an incomplete record (no checkpoint to wait for)."""

from __future__ import annotations

import logging
import threading

import pytest

from lattice.runtime.agent.stopping import StopAgreement
from lattice.runtime.kv import create_backend

log = logging.getLogger("test")


class FakeGroup:
    """A worker group whose furthest worker is ``at`` steps minus the margin: records the holds."""

    def __init__(self, proposal: int):
        self.proposal, self.holds = proposal, []

    def stop_step(self, lead_time: float) -> int:
        return self.proposal

    def hold(self, at_step: int) -> None:
        self.holds.append(at_step)


@pytest.fixture
def store():  # type: ignore[no-untyped-def]
    kv = create_backend("embedded", min_session_ttl=0.5)
    yield kv
    kv.close()


def test_the_stop_step_is_the_largest_proposal_and_lower_holds_are_raised(store, prefix: str) -> None:  # type: ignore[no-untyped-def]
    key, members = prefix + "stop/3", ("a", "b")
    a, b = FakeGroup(12), FakeGroup(40)
    rec_a = StopAgreement(store, key, "a", members, log).join(a, leaving=False)
    assert rec_a["at"] == 12 and a.holds == [12, 12]  # held at its own proposal before and after merging
    rec_b = StopAgreement(store, key, "b", members, log).join(b, leaving=True)
    assert rec_b["at"] == 40 and rec_b["leaving"] == ["b"] and sorted(rec_b["acks"]) == ["a", "b"]
    final = StopAgreement(store, key, "a", members, log).settle(rec_a, timeout=5)
    assert final["complete"] and final["at"] == 40  # a's workers go on from 12 to 40


def test_concurrent_joins_agree_on_the_maximum(store, prefix: str) -> None:  # type: ignore[no-untyped-def]
    key = prefix + "stop/0"
    proposals = {f"n{i}": p for i, p in enumerate([7, 31, 19, 25, 3])}
    members = tuple(proposals)
    finals: dict[str, dict] = {}

    def agent(node: str) -> None:
        agreement = StopAgreement(store, key, node, members, log)
        finals[node] = agreement.settle(agreement.join(FakeGroup(proposals[node]), leaving=False), timeout=10)

    threads = [threading.Thread(target=agent, args=(n,)) for n in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert {n: (f["at"], f["complete"]) for n, f in finals.items()} == {n: (31, True) for n in members}


def test_a_member_that_never_acknowledges_makes_the_stop_incomplete(store, prefix: str) -> None:  # type: ignore[no-untyped-def]
    key = prefix + "stop/1"
    agreement = StopAgreement(store, key, "a", ("a", "dead"), log)
    final = agreement.settle(agreement.join(FakeGroup(9), leaving=False), timeout=0.5)
    assert final["complete"] is False and final["at"] == 9


def test_a_store_that_goes_away_during_the_agreement_still_gives_a_planned_stop(store, prefix: str) -> None:  # type: ignore[no-untyped-def]
    from lattice.runtime.kv.api import KVUnavailable

    class Down:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
                raise KVUnavailable("connection refused")
            return fail

    key = prefix + "stop/2"
    record = StopAgreement(store, key, "a", ("a", "b"), log).join(FakeGroup(15), leaving=False)
    final = StopAgreement(Down(), key, "a", ("a", "b"), log).settle(record, timeout=0.5)  # type: ignore[arg-type]
    assert final["complete"] and final["at"] == 15  # checkpoint at the best step known, as before


def test_a_member_that_left_ends_the_wait_at_once(store, prefix: str) -> None:  # type: ignore[no-untyped-def]
    import time

    store.cas(prefix + "members/a", b"{}", 0)  # a is registered; "gone" never was (or has left)
    agreement = StopAgreement(store, prefix + "stop/1", "a", ("a", "gone"), log,
                              members_prefix=prefix + "members/")
    t0 = time.monotonic()
    final = agreement.settle(agreement.join(FakeGroup(9), leaving=False), timeout=30)
    assert final["complete"] is False and time.monotonic() - t0 < 5
