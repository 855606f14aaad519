"""Limits that travel in the round document: agents started from an older TrainingJob spec (a
pod's flags cannot change) follow the newest spec generation any agent of the job brought, so
raising maxSize lets new agents in without replacing the running ones. Agents without a
generation (plain ``lattice run``) keep their own limits, as before."""

from __future__ import annotations

from lattice.runtime.rendezvous.decide import (
    CLOSED,
    Limits,
    RoundState,
    Run,
    Wait,
    Write,
    close,
    decide,
    reopen,
)

OLD, NEW = Limits(1, 2, 1.0, generation=1), Limits(1, 3, 1.0, generation=2)
ALIVE = frozenset({"a", "b", "c"})


def running(ranks: dict[str, int], **kw) -> RoundState:
    return RoundState(round=4, phase=CLOSED, ranks=tuple(sorted(ranks.items(), key=lambda kv: kv[1])), **kw)


def test_a_newer_agent_publishes_its_limits_and_older_agents_make_room_for_it() -> None:
    fresh = running({"a": 0, "b": 1})
    state = decide(fresh, "a", ALIVE, 0.0, OLD).state  # the first agents publish their spec's limits
    assert state.sizes == (1, 1, 2)  # full under the old maxSize 2
    assert decide(state, "a", ALIVE, 0.0, OLD) == Run(4, 0, 2, join_pending=False)
    action = decide(state, "c", ALIVE, 0.0, NEW)  # a pod of the edited spec (maxSize 3) arrives
    assert action == Write(RoundState(**{**state.__dict__, "sizes": (2, 1, 3)}))
    state = action.state
    state = decide(state, "c", ALIVE, 0.0, NEW).state  # then asks to join
    assert state.waiting == ("c",)
    assert decide(state, "a", ALIVE, 0.0, OLD) == Run(4, 0, 2, join_pending=True)  # room under max 3
    opened = reopen(state)
    assert opened.sizes == (2, 1, 3)
    three = close(RoundState(**{**opened.__dict__, "joined": ("a", "b", "c")}))
    assert three.sizes == (2, 1, 3) and len(three.ranks) == 3


def test_older_limits_never_replace_newer_ones_and_generation_0_publishes_nothing() -> None:
    state = running({"a": 0, "b": 1}, sizes=(2, 1, 3))
    assert decide(state, "a", ALIVE, 0.0, OLD) == Run(4, 0, 2, join_pending=False)  # no Write of gen 1
    plain = running({"a": 0, "b": 1})
    assert decide(plain, "c", ALIVE, 0.0, Limits(1, 2, 1.0)) == Write(RoundState(**{**plain.__dict__, "waiting": ("c",)}))
    full = RoundState(round=1, joined=("a", "b"))
    assert decide(full, "c", ALIVE, 0.0, Limits(1, 2, 1.0)) == Wait()  # its own max 2: full


def test_sizes_survive_the_json_document() -> None:
    state = running({"a": 0}, sizes=(7, 2, 5))
    assert RoundState.from_json(state.to_json()) == state
    assert RoundState.from_json(running({"a": 0}).to_json()).sizes is None
