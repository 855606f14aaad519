"""The rendezvous executor against real stores: the embedded server over HTTP and a real etcd.

Agents are threads (each with its own store client and session) or, in one test, separate
processes. TTLs are the shortest each server allows (embedded 1 s, lapsing after 2 s as in
Consul; etcd 2 s), so a dead agent is noticed within a few seconds.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rdzv_support import RdzvEnv, check_round, join_all

from lattice.runtime.kv.server import start_server
from lattice.runtime.rendezvous.api import (
    JoinPending,
    PeerLost,
    RendezvousClosed,
    RendezvousTimeout,
)
from lattice.runtime.rendezvous.decide import CLOSED, OPEN, Limits

CHILD = Path(__file__).with_name("rdzv_child.py")


@pytest.mark.timeout(60)
def test_agents_get_contiguous_ranks_and_one_master(rdzv_env: RdzvEnv) -> None:
    hs = [rdzv_env.handler(f"n{i}", Limits(6, 6, last_call=5.0)) for i in range(6)]
    t0 = time.monotonic()
    results = join_all(hs, timeout=20)
    first = check_round(results)
    assert time.monotonic() - t0 < 5.0, "a round at max must close without waiting for the last call"
    assert first.round == 0 and first.master.port > 0
    assert {m.node for m in first.members} == {f"n{i}" for i in range(6)}
    assert all(h.round_state.phase == CLOSED for h in hs)


@pytest.mark.timeout(60)
def test_round_closes_at_min_after_last_call(rdzv_env: RdzvEnv) -> None:
    hs = [rdzv_env.handler(f"n{i}", Limits(2, 4, last_call=1.0)) for i in range(2)]
    t0 = time.monotonic()
    results = join_all(hs, timeout=20)
    elapsed = time.monotonic() - t0
    assert check_round(results).world == 2
    assert 0.9 <= elapsed < 6.0, f"closed after {elapsed:.2f}s, last call is 1 s"


@pytest.mark.timeout(60)
def test_extra_agent_beyond_max_waits_then_join_pending(rdzv_env: RdzvEnv) -> None:
    limits = Limits(2, 2, last_call=0.2)
    a, b = rdzv_env.handler("a", limits), rdzv_env.handler("b", limits)
    check_round(join_all([a, b], timeout=20))
    c = rdzv_env.handler("c", limits)
    with pytest.raises(RendezvousTimeout, match="job"):
        c.join(1.0)  # full: c waits for the next round, which never comes (no room below max)
    assert a.next_event(0.5) is None, "no JoinPending when the round is already at max"


@pytest.mark.timeout(60)
def test_join_timeout_names_job_min_and_seen_nodes(rdzv_env: RdzvEnv) -> None:
    h = rdzv_env.handler("lonely", Limits(3, 4, last_call=0.1))
    t0 = time.monotonic()
    with pytest.raises(RendezvousTimeout) as err:
        h.join(0.7)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert rdzv_env.job in msg and "at least 3" in msg and "lonely" in msg


@pytest.mark.timeout(60)
def test_dead_agent_gives_peer_lost_and_ranks_are_kept(rdzv_env: RdzvEnv) -> None:
    limits = Limits(2, 4, last_call=0.3)
    hs = [rdzv_env.handler(f"n{i}", limits) for i in range(4)]
    results = join_all(hs, timeout=20)
    before = check_round(results)
    by_rank = {a.rank: node for node, a in results.items()}
    victim = next(h for h in hs if h.member.node == by_rank[2])
    victim._stop_keepalive()  # hung agent: its session lapses, its key vanishes
    survivors = [h for h in hs if h is not victim]
    t0 = time.monotonic()
    for h in survivors:
        event = h.next_event(rdzv_env.lapse + 6)
        assert isinstance(event, PeerLost), event
        assert event.nodes in ((victim.member.node,), ())
    assert time.monotonic() - t0 < rdzv_env.lapse + 5
    after = check_round(join_all(survivors, timeout=20))
    assert after.round == before.round + 1 and after.world == 3
    assert after.nodes[:2] == before.nodes[:2], "surviving ranks 0 and 1 keep their ranks"
    assert after.nodes[2] == by_rank[3]


@pytest.mark.timeout(60)
def test_leave_is_seen_at_once_and_rank_zero_leaving_is_replaced(rdzv_env: RdzvEnv) -> None:
    limits = Limits(1, 3, last_call=0.2)
    hs = [rdzv_env.handler(f"n{i}", limits) for i in range(3)]
    before = check_round(join_all(hs, timeout=20))
    master = next(h for h in hs if h.member.node == before.master.node)
    master.leave()
    with pytest.raises(RendezvousClosed):
        master.join(1)
    rest = [h for h in hs if h is not master]
    t0 = time.monotonic()
    assert all(isinstance(h.next_event(10), PeerLost) for h in rest)
    assert time.monotonic() - t0 < 2.0, "a destroyed session's key vanishes at once"
    after = check_round(join_all(rest, timeout=20))
    assert after.world == 2 and after.master.node != before.master.node


@pytest.mark.timeout(60)
def test_newcomer_yields_join_pending_then_everyone_is_in_next_round(rdzv_env: RdzvEnv) -> None:
    limits = Limits(2, 3, last_call=0.3)
    hs = [rdzv_env.handler(f"n{i}", limits) for i in range(2)]
    before = check_round(join_all(hs, timeout=20))
    newcomer = rdzv_env.handler("late", limits)
    out: queue.Queue = queue.Queue()
    t = threading.Thread(target=lambda: out.put(newcomer.join(30)), daemon=True)
    t.start()
    for h in hs:
        event = h.next_event(10)
        assert event == JoinPending(before.round, ("late",))
        assert h.poll_event() is None, "an event is reported once"
    hs[0].request_new_round()
    hs[0].request_new_round()  # idempotent
    for h in hs:
        assert isinstance(h.next_event(10), PeerLost)  # the round moved on
    results = join_all(hs, timeout=20)
    t.join(20)
    results["late"] = out.get_nowait()
    after = check_round(results)
    assert after.round == before.round + 1 and after.world == 3
    assert after.nodes[:2] == before.nodes and after.nodes[2] == "late"


@pytest.mark.timeout(60)
def test_poll_event_does_not_block(rdzv_env: RdzvEnv) -> None:
    hs = [rdzv_env.handler(f"n{i}", Limits(2, 2, last_call=0.1)) for i in range(2)]
    join_all(hs, timeout=20)
    t0 = time.monotonic()
    assert hs[0].poll_event() is None
    assert time.monotonic() - t0 < 1.0
    hs[1].leave()
    deadline = time.monotonic() + 5
    while (event := hs[0].poll_event()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(event, PeerLost) and event.nodes == ("n1",)


def _spawn(env: RdzvEnv, node: str, lo: int, hi: int) -> subprocess.Popen[str]:
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, str(CHILD), env.backend, env.url, env.job, node, str(lo), str(hi),
         str(env.ttl)],
        stdout=subprocess.PIPE, text=True, start_new_session=True, env=env_vars)


def _reader(proc: subprocess.Popen[str], out: queue.Queue) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.put(json.loads(line))


def _collect(out: queue.Queue, want: int, pred, timeout: float) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        msg = out.get(timeout=max(deadline - time.monotonic(), 0.01))
        if pred(msg):
            got.append(msg)
    return got


@pytest.mark.timeout(60)
def test_processes_re_rendezvous_after_sigkill(rdzv_env: RdzvEnv) -> None:
    procs = [_spawn(rdzv_env, f"p{i}", 2, 3) for i in range(3)]
    out: queue.Queue = queue.Queue()
    try:
        for p in procs:
            threading.Thread(target=_reader, args=(p, out), daemon=True).start()
        first = _collect(out, 3, lambda m: "rank" in m, 40)
        assert sorted(m["rank"] for m in first) == [0, 1, 2]
        assert len({(m["round"], m["master"]) for m in first}) == 1
        victim = next(m for m in first if m["rank"] == 1)["node"]
        os.killpg(procs[int(victim[1:])].pid, signal.SIGKILL)
        second = _collect(out, 2, lambda m: m.get("world") == 2, rdzv_env.lapse + 20)
        assert {m["node"] for m in second} == {"p0", "p1", "p2"} - {victim}
        assert {m["round"] for m in second} == {first[0]["round"] + 1}
        assert sorted(m["rank"] for m in second) == [0, 1]
        assert {m["master"] for m in second} == {first[0]["master"]}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            if p.stdout is not None:
                p.stdout.close()


# ---------------------------------------------------------------- store outages (embedded)


@pytest.fixture
def embedded_env() -> Iterator[RdzvEnv]:
    """The outage tests stop and restart the embedded server on the same port, keeping its data."""
    handle = start_server("127.0.0.1", 0, min_session_ttl=0.5)
    env = RdzvEnv("embedded", "consul", handle.url, 1.0, 2.0, handle)
    yield env
    env.close()
    handle.stop()


def _outage(env: RdzvEnv, seconds: float, *, reset_session_timers: bool = True) -> threading.Thread:
    env.server.stop()

    def back() -> None:
        time.sleep(seconds)
        env.server.restart(reset_session_timers=reset_session_timers)

    t = threading.Thread(target=back, daemon=True)
    t.start()
    return t


@pytest.mark.timeout(60)
def test_join_carries_on_when_store_returns(embedded_env: RdzvEnv) -> None:
    hs = [embedded_env.handler(f"n{i}", Limits(3, 3, last_call=0.2)) for i in range(3)]
    t = _outage(embedded_env, 2.0)
    results = join_all(hs, timeout=20)
    t.join()
    assert check_round(results).world == 3


@pytest.mark.timeout(60)
def test_next_event_carries_on_through_short_outage(embedded_env: RdzvEnv) -> None:
    hs = [embedded_env.handler(f"n{i}", Limits(3, 3, last_call=0.2)) for i in range(3)]
    before = check_round(join_all(hs, timeout=20))
    t = _outage(embedded_env, 2.0)
    assert hs[0].next_event(3.0) is None, "an outage alone is no event"
    t.join()
    assert hs[1].next_event(0.5) is None
    hs[2].leave()
    assert isinstance(hs[0].next_event(5), PeerLost)
    assert hs[0].round_state.round == before.round


@pytest.mark.timeout(60)
def test_sessions_lapsed_during_outage_are_recreated_and_round_moves_on(
        embedded_env: RdzvEnv) -> None:
    hs = [embedded_env.handler(f"n{i}", Limits(3, 3, last_call=0.2)) for i in range(3)]
    before = check_round(join_all(hs, timeout=20))
    t = _outage(embedded_env, 3.0, reset_session_timers=False)  # > 2 x TTL: every session lapses
    t.join()
    for h in hs:
        assert isinstance(h.next_event(10), PeerLost)
    after = check_round(join_all(hs, timeout=20))
    assert after.round > before.round and after.world == 3
    assert after.nodes == before.nodes
    assert hs[0].round_state.phase in (CLOSED, OPEN)
