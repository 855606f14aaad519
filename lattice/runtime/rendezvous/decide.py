"""The rendezvous decision logic as a pure function: observed state -> next action.

One JSON document per job (``RoundState``) is the only shared state; it is changed only
by compare-and-set on the store's modify index (the fencing token), so two agents acting
on the same observation cannot both win. Liveness comes from membership keys bound to each
agent's session or lease: ``alive`` is the set of agents whose key still exists.

A round is *open* while agents join. Once ``min_nodes`` have joined the last call starts;
the round *closes* (ranks assigned) when ``max_nodes`` have joined or the last call ends.
While a round is closed, newcomers add themselves to ``waiting``; members see that and
reopen the next round at their next safe point (``reopen``). A member that disappears
makes the next observer reopen at once. Ranks are contiguous ``0..N-1`` and survivors keep
their previous rank when it is still below N, so rank 0 stays rank 0 unless it left.

The executor (``handler.py``) batches joins: a live membership key is the join request,
and before calling :func:`decide` an agent folds every live member not yet in ``joined``
into its view of an open document, so ``joined`` is written only together with a write
``decide`` makes anyway (last call starts, round closes, a member vanished). A round of N
agents then costs a constant number of document writes and wake-ups per agent, not N.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

OPEN, CLOSED = "open", "closed"


@dataclasses.dataclass(frozen=True)
class Limits:
    min_nodes: int
    max_nodes: int
    last_call: float = 5.0  # seconds between reaching min_nodes and closing the round
    generation: int = 0  # the job spec's generation these limits come from (0: none, fixed limits)

    def __post_init__(self) -> None:
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ValueError(f"need 1 <= min <= max nodes, got {self.min_nodes}:{self.max_nodes}")


@dataclasses.dataclass(frozen=True)
class RoundState:
    round: int = 0
    phase: str = OPEN
    joined: tuple[str, ...] = ()  # open: agents in this round, in join order
    ranks: tuple[tuple[str, int], ...] = ()  # closed: this round's ranks; open: the previous round's
    deadline: float | None = None  # open: when the last call ends
    waiting: tuple[str, ...] = ()  # closed: agents that want to join the next round
    sizes: tuple[int, int, int] | None = None  # (generation, min, max) of the newest limits seen

    @property
    def rank_of(self) -> dict[str, int]:
        return dict(self.ranks)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> RoundState:
        if not raw:
            return cls()
        d: dict[str, Any] = json.loads(raw)
        sizes = d.get("sizes")
        return cls(round=d["round"], phase=d["phase"], joined=tuple(d["joined"]),
                   ranks=tuple((n, r) for n, r in d["ranks"]), deadline=d["deadline"],
                   waiting=tuple(d["waiting"]), sizes=tuple(sizes) if sizes else None)


@dataclasses.dataclass(frozen=True)
class Write:
    """Compare-and-set the state document to ``state`` (then observe again)."""

    state: RoundState


@dataclasses.dataclass(frozen=True)
class Wait:
    """Nothing to do until the state or membership changes, or until ``until`` (if set)."""

    until: float | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    """This agent is ``rank`` of ``world`` in closed ``round``; ``join_pending`` asks for a safe point."""

    round: int
    rank: int
    world: int
    join_pending: bool = False


Action = Write | Wait | Run


def effective(state: RoundState, limits: Limits) -> Limits:
    """The limits to act on: this agent's, or newer ones another agent published in the document.

    Agents started from an older spec (a Kubernetes pod's flags cannot change) follow the limits
    of the newest spec generation any agent of the job brought, so raising ``maxSize`` lets new
    agents in without replacing the running ones.
    """
    if state.sizes is None or state.sizes[0] <= limits.generation:
        return limits
    gen, lo, hi = state.sizes
    return Limits(lo, hi, limits.last_call, gen)


def with_limits(state: RoundState, limits: Limits) -> RoundState | None:
    """``state`` carrying ``limits`` if it holds older ones or none; None if it holds these or newer."""
    if state.sizes is not None and state.sizes[0] >= limits.generation:
        return None
    return dataclasses.replace(state, sizes=(limits.generation, limits.min_nodes, limits.max_nodes))


def decide(state: RoundState, me: str, alive: frozenset[str], now: float, limits: Limits) -> Action:
    """The next action of agent ``me`` given the observed document and live agents."""
    if limits.generation > 0 and (newer := with_limits(state, limits)) is not None:
        return Write(newer)  # publish newer limits first
    limits = effective(state, limits)
    if state.phase == CLOSED:
        return _closed(state, me, alive, limits)
    return _open(state, me, alive, now, limits)


def _closed(state: RoundState, me: str, alive: frozenset[str], limits: Limits) -> Action:
    ranks = state.rank_of
    if any(node not in alive for node in ranks):
        return Write(reopen(state))
    waiting = tuple(n for n in state.waiting if n in alive and n not in ranks)
    if me in ranks:
        if waiting != state.waiting:
            return Write(dataclasses.replace(state, waiting=waiting))
        room = len(ranks) < limits.max_nodes
        return Run(state.round, ranks[me], len(ranks), join_pending=bool(waiting) and room)
    if me not in waiting:
        return Write(dataclasses.replace(state, waiting=waiting + (me,)))
    return Wait()


def _open(state: RoundState, me: str, alive: frozenset[str], now: float, limits: Limits) -> Action:
    joined = tuple(n for n in state.joined if n in alive)
    if joined != state.joined:
        deadline = state.deadline if len(joined) >= limits.min_nodes else None
        return Write(dataclasses.replace(state, joined=joined, deadline=deadline))
    if me not in joined:
        if len(joined) >= limits.max_nodes:
            return Wait()  # full: this agent joins the next round
        return Write(dataclasses.replace(state, joined=joined + (me,)))
    if len(joined) >= limits.max_nodes or (state.deadline is not None and now >= state.deadline):
        return Write(close(state))
    if len(joined) >= limits.min_nodes:
        if state.deadline is None:
            return Write(dataclasses.replace(state, deadline=now + limits.last_call))
        return Wait(until=state.deadline)
    return Wait()


def close(state: RoundState) -> RoundState:
    """Freeze an open round: contiguous ranks, survivors keeping theirs where they still fit."""
    n = len(state.joined)
    previous = state.rank_of
    kept = {node: previous[node] for node in state.joined if node in previous and previous[node] < n}
    free = iter(sorted(set(range(n)) - set(kept.values())))
    ranks = {node: kept[node] if node in kept else next(free) for node in state.joined}
    return RoundState(round=state.round, phase=CLOSED, joined=(),
                      ranks=tuple(sorted(ranks.items(), key=lambda kv: kv[1])), deadline=None, waiting=(),
                      sizes=state.sizes)


def reopen(state: RoundState) -> RoundState:
    """Start the next round (a member left, or a waiting agent is let in at a safe point).

    Everyone joins again; the closed round's ranks are kept as the preference for the next.
    """
    return RoundState(round=state.round + 1, phase=OPEN, joined=(), ranks=state.ranks, deadline=None, waiting=(),
                      sizes=state.sizes)
