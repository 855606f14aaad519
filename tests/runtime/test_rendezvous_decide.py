"""Hypothesis stateful tests of the pure rendezvous logic: random joins, crashes, stale
observations (store delays), safe points and time. Agents act on observations that may be
out of date; the store applies their writes only by compare-and-set on its index."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lattice.runtime.rendezvous.decide import (
    CLOSED,
    OPEN,
    Limits,
    RoundState,
    Run,
    Wait,
    Write,
    close,
    decide,
    reopen,
)


class Rendezvous(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.doc, self.index, self.now = RoundState(), 0, 0.0
        self.alive: set[str] = set()
        self.obs: dict[str, tuple[RoundState, int, frozenset[str], float]] = {}
        self.runs: dict[int, dict[int, str]] = {}  # round -> rank -> node
        self.count = 0

    @initialize(lo=st.integers(1, 3), extra=st.integers(0, 3), last_call=st.sampled_from([0.0, 1.0, 5.0]))
    def limits(self, lo: int, extra: int, last_call: float) -> None:
        self.lim = Limits(lo, lo + extra, last_call)

    def _cas(self, seen: int, new: RoundState, alive_seen: frozenset[str]) -> None:
        if seen != self.index:
            return  # stale: the store refuses, the agent observes again
        if new.phase == CLOSED and self.doc.phase == OPEN:
            nodes = [n for n, _ in new.ranks]
            assert len(nodes) >= self.lim.min_nodes, "a round closed with fewer than min nodes"
            assert all(n in alive_seen for n in nodes), "a round closed with a node seen dead"
        self.doc, self.index = new, self.index + 1

    @rule()
    def join(self) -> None:
        self.count += 1
        self.alive.add(f"n{self.count}")

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        if self.alive:
            node = data.draw(st.sampled_from(sorted(self.alive)))
            self.alive.discard(node)
            self.obs.pop(node, None)

    @rule(data=st.data())
    def observe(self, data: st.DataObject) -> None:
        if self.alive:
            node = data.draw(st.sampled_from(sorted(self.alive)))
            self.obs[node] = (self.doc, self.index, frozenset(self.alive), self.now)

    @rule(data=st.data(), at_safe_point=st.booleans())
    def act(self, data: st.DataObject, at_safe_point: bool) -> None:
        if not self.obs:
            return
        node = data.draw(st.sampled_from(sorted(self.obs)))
        self._act(node, at_safe_point)

    def _act(self, node: str, at_safe_point: bool) -> object:
        doc, index, alive, now = self.obs.pop(node)
        action = decide(doc, node, alive, now, self.lim)
        if isinstance(action, Write):
            self._cas(index, action.state, alive)
        elif isinstance(action, Run):
            owner = self.runs.setdefault(action.round, {}).setdefault(action.rank, node)
            assert owner == node, f"round {action.round}: rank {action.rank} held by {owner} and {node}"
            assert 0 <= action.rank < action.world <= self.lim.max_nodes
            if action.join_pending and at_safe_point:
                self._cas(index, reopen(doc), alive)
        return action

    @rule(data=st.data())
    def fresh_act(self, data: st.DataObject) -> None:
        """Observe and act at once (no store delay)."""
        if self.alive:
            node = data.draw(st.sampled_from(sorted(self.alive)))
            self.obs[node] = (self.doc, self.index, frozenset(self.alive), self.now)
            self._act(node, at_safe_point=data.draw(st.booleans()))

    @rule()
    def settle(self) -> None:
        """Let every live agent act until the job is quiet (then more joins and crashes follow)."""
        self._settle()

    @rule(dt=st.sampled_from([0.5, 2.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def ranks_are_contiguous(self) -> None:
        if self.doc.phase == CLOSED:
            ranks = sorted(r for _, r in self.doc.ranks)
            assert ranks == list(range(len(ranks)))
            assert self.lim.min_nodes <= len(ranks) <= self.lim.max_nodes

    def teardown(self) -> None:
        """With no more joins or crashes, every live node ends up in the latest round."""
        if not hasattr(self, "lim"):
            return
        self._settle()
        n = len(self.alive)
        if n == 0:
            return  # nobody left to observe: the stale document is reopened by the next agent
        if n < self.lim.min_nodes:
            assert self.doc.phase == OPEN
            return
        assert self.doc.phase == CLOSED, f"{n} live nodes but the round never closed: {self.doc}"
        members = {node for node, _ in self.doc.ranks}
        assert len(members) == min(n, self.lim.max_nodes)
        assert members <= self.alive
        assert self.alive - members <= set(self.doc.waiting)

    def _settle(self) -> None:
        self.obs.clear()
        for _ in range(60):
            actions = {}
            for node in sorted(self.alive):
                self.obs[node] = (self.doc, self.index, frozenset(self.alive), self.now)
                actions[node] = self._act(node, at_safe_point=True)
            if all(isinstance(a, Run | Wait) for a in actions.values()):
                self.now += self.lim.last_call + 1
                if all(isinstance(a, Run) and not a.join_pending for a in actions.values()):
                    break


TestRendezvousStateMachine = Rendezvous.TestCase
TestRendezvousStateMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])


def test_survivors_keep_their_ranks_and_rank_zero_stays() -> None:
    closed = close(RoundState(joined=("a", "b", "c", "d")))
    assert closed.rank_of == {"a": 0, "b": 1, "c": 2, "d": 3}
    again = reopen(closed)
    again = RoundState(round=again.round, joined=("d", "e", "a"), ranks=again.ranks)
    ranks = close(again).rank_of
    assert ranks["a"] == 0 and sorted(ranks.values()) == [0, 1, 2]
    # d's old rank 3 no longer fits: the free ranks go to d and e in join order
    assert ranks["d"] == 1 and ranks["e"] == 2


def test_round_closes_at_max_at_once_and_after_last_call_at_min() -> None:
    lim = Limits(2, 3, last_call=5.0)
    s = RoundState(joined=("a", "b"))
    a = decide(s, "a", frozenset("ab"), 0.0, lim)
    assert isinstance(a, Write) and a.state.deadline == 5.0
    assert isinstance(decide(a.state, "a", frozenset("ab"), 1.0, lim), Wait)
    closed = decide(a.state, "b", frozenset("ab"), 5.0, lim)
    assert isinstance(closed, Write) and closed.state.phase == CLOSED
    full = decide(RoundState(joined=("a", "b", "c")), "c", frozenset("abc"), 0.0, lim)
    assert isinstance(full, Write) and full.state.phase == CLOSED


def test_state_document_round_trips_through_json() -> None:
    s = RoundState(round=3, phase=CLOSED, ranks=(("a", 0), ("b", 1)), waiting=("c",))
    assert RoundState.from_json(s.to_json()) == s
    assert RoundState.from_json(None) == RoundState()


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="min <= max"):
        Limits(3, 2)


def test_ranks_stay_contiguous_when_a_middle_rank_leaves() -> None:
    closed = close(RoundState(joined=("a", "b", "c")))
    survivors = RoundState(round=1, joined=("a", "c"), ranks=reopen(closed).ranks)
    assert close(survivors).rank_of == {"a": 0, "c": 1}
