"""The rendezvous executor: observe the store, :func:`decide`, apply, repeat.

One :class:`RendezvousHandler` per agent. ``join`` loops over

1. *observe*: one ``list`` of ``lattice/<job>/`` gives the round document with
   its modify index and the live membership keys;
2. *decide*: the pure :func:`~lattice.runtime.rendezvous.decide.decide`;
3. *apply*: ``Write`` is a compare-and-set on the document's modify index (the
   fencing token; a lost CAS just observes again), ``Wait`` a blocking
   ``store.wait`` until the store changes or the last call ends, ``Run`` returns
   the :class:`Assignment`.

Batching, so the cost per agent does not grow with the number of agents:

* An agent does not write itself into the open round. Its membership key is its
  join request; before deciding, every agent folds all live members that are
  not yet in ``joined`` into its view of the document (previous ranks first,
  then arrival order, up to ``max``). The view is written only when ``decide``
  writes anyway: when the last call starts (``min`` reached), when the round
  closes, or when a joined member vanished. A round of N agents therefore takes
  a constant number of document writes, not N.
* While joining, an agent waits on the document key only, so arrivals of other
  agents do not wake it; the agent whose arrival reaches ``min`` or ``max`` sees
  everyone in its own read and writes. Only an agent waiting outside a closed
  round watches the whole job (it must see the members vanish).

The store being unreachable (:class:`KVUnavailable`) is retried with a bounded
exponential backoff until the caller's timeout; a session that lapsed meanwhile
is replaced (see :mod:`~lattice.runtime.rendezvous.session`) and the round
moves on.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from lattice.runtime.kv.api import CASConflict, KVEntry, KVStore, KVUnavailable, SessionExpired
from lattice.runtime.rendezvous.api import (
    Assignment,
    Event,
    JoinPending,
    Keys,
    Member,
    PeerLost,
    RendezvousClosed,
    RendezvousTimeout,
)
from lattice.runtime.rendezvous.decide import (
    CLOSED,
    OPEN,
    Limits,
    RoundState,
    Run,
    Wait,
    Write,
    decide,
    effective,
    reopen,
)
from lattice.runtime.rendezvous.session import Backoff, MemberSession

_LOG = logging.getLogger("lattice.rendezvous")


@dataclasses.dataclass(frozen=True)
class View:
    """One observation: the document, its modify index (0: absent), the live members."""

    state: RoundState
    doc_index: int
    members: dict[str, KVEntry]
    index: int


class _Log(logging.LoggerAdapter):
    """Prefix every line with job, node and the last observed round."""

    def __init__(self, job: str, node: str, round_of: Callable[[], int]) -> None:
        super().__init__(_LOG, {"job": job, "node": node})
        self._round_of = round_of

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = {**(self.extra or {}), "round": self._round_of()}
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[job={extra['job']} node={extra['node']} round={extra['round']}] {msg}", kwargs


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def fold_members(state: RoundState, members: dict[str, KVEntry], limits: Limits) -> RoundState:
    """The open document with every live member not yet in ``joined`` added (up to ``max``)."""
    if state.phase != OPEN:
        return state
    room = limits.max_nodes - sum(1 for n in state.joined if n in members)
    previous = state.rank_of
    pending = sorted((n for n in members if n not in state.joined),
                     key=lambda n: (previous.get(n, limits.max_nodes), members[n].create_index, n))
    return dataclasses.replace(state, joined=state.joined + tuple(pending[:max(room, 0)]))


class RendezvousHandler:
    """Join rounds of ``job`` as ``node`` through ``store`` (see the module docstring).

    Args:
        store: the KV store (shared by nothing else that destroys our session).
        job: the job name (keys live under ``lattice/<job>/``).
        node: this agent's unique name.
        limits: min/max agents and the last call.
        addr, port: where this agent's rank-0 services would listen; ``port=0``
            picks a free port on ``addr``.
        info: extra JSON-able facts published with the membership key.
        ttl: session TTL in seconds.
        clock: wall clock shared by all agents (the last call deadline is absolute).
    """

    def __init__(self, store: KVStore, job: str, node: str, limits: Limits, *,
                 addr: str = "127.0.0.1", port: int = 0, info: dict[str, Any] | None = None,
                 ttl: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self._store, self._node, self._limits, self._clock = store, node, limits, clock
        self._keys = Keys(job)
        self.job = job
        self.member = Member(node, addr, port or _free_port(addr), dict(info or {}))
        self._state = RoundState()
        self._assignment: Assignment | None = None
        self._reported: Event | None = None
        self._incarnation: dict[str, int] = {}  # member -> key create index when we got Run
        self._lapsed = threading.Event()
        self._left = False
        self.log = _Log(job, node, lambda: self._state.round)
        self._session = MemberSession(store, self._keys.member(node), self.member.to_json(), ttl,
                                      self.log, self._lapsed.set)

    # ------------------------------------------------------------ properties
    @property
    def round_state(self) -> RoundState:
        """The round document as last observed."""
        return self._state

    @property
    def assignment(self) -> Assignment | None:
        """The last assignment ``join`` returned (None before the first)."""
        return self._assignment

    # ------------------------------------------------------------------ join
    def join(self, timeout: float) -> Assignment:
        """Take part in the next closed round and return this agent's place in it.

        Raises:
            RendezvousTimeout: when no round including this agent closed in time.
            RendezvousClosed: after :meth:`leave`.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        self._reported = None
        view = self._retry(self._open_and_observe, deadline)
        while True:
            result = self._retry(lambda v=view: self._step(v, deadline), deadline)
            if isinstance(result, Assignment):
                self._assignment = result
                self.log.info("running as rank %d of %d (master %s:%d)", result.rank,
                              result.world, result.master.addr, result.master.port)
                return result
            view = result

    def _open_and_observe(self) -> View:
        self._session.open()
        if self._lapsed.is_set() and self._assignment is not None:
            # Our session lapsed and was replaced: peers may not have seen our key vanish,
            # so end our old round ourselves (no-op if it already moved on).
            self._reopen(self._assignment.round)
        self._lapsed.clear()
        return self._observe()

    def _step(self, view: View, deadline: float) -> View | Assignment:
        if view.doc_index == 0:  # the first agent creates the document, so waits have a key
            self._cas(RoundState(), 0)
            return self._observe()
        if self._node not in view.members:  # our key vanished (lapsed session): put it back
            self._session.ensure_key()
            return self._observe()
        state = fold_members(view.state, view.members, effective(view.state, self._limits))
        action = decide(state, self._node, self._alive(view), self._clock(), self._limits)
        if isinstance(action, Run):
            return self._make_assignment(view, action)
        if isinstance(action, Write):
            self._cas(action.state, view.doc_index)
            return self._observe()
        return self._wait(view, action, deadline)

    def _wait(self, view: View, action: Wait, deadline: float) -> View:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout(view)
        if action.until is not None:
            remaining = min(remaining, max(action.until - self._clock(), 0.0) + 0.01)
        outside = view.state.phase == CLOSED and self._node not in view.state.rank_of
        key = self._keys.prefix if outside else self._keys.state
        self._store.wait(key, view.index, remaining)
        return self._observe()

    def _cas(self, state: RoundState, index: int) -> bool:
        try:
            self._store.cas(self._keys.state, state.to_json(), index)
        except CASConflict:
            return False
        self.log.debug("wrote round %d %s joined=%s ranks=%s", state.round, state.phase,
                       state.joined, state.ranks)
        return True

    def _alive(self, view: View) -> frozenset[str]:
        """Live members; in our own closed round a re-created key (new session) counts as gone."""
        mine = self._assignment
        if mine is None or view.state.round != mine.round or view.state.phase != CLOSED:
            return frozenset(view.members)
        return frozenset(n for n, e in view.members.items()
                         if self._incarnation.get(n, e.create_index) == e.create_index)

    def _make_assignment(self, view: View, run: Run) -> Assignment:
        self._incarnation = {n: e.create_index for n, e in view.members.items()}
        members = tuple(Member.from_json(node, view.members[node].value)
                        for node, _ in sorted(view.state.ranks, key=lambda nr: nr[1]))
        return Assignment(run.round, run.rank, run.world, members)

    def _timeout(self, view: View) -> RendezvousTimeout:
        seen, limits = sorted(view.members), effective(view.state, self._limits)  # as decide() saw them
        return RendezvousTimeout(
            f"rendezvous of job {self.job!r} timed out for node {self._node!r}: need at least "
            f"{limits.min_nodes} nodes (max {limits.max_nodes}), saw {len(seen)}: "
            f"{', '.join(seen) or '(none)'}; round {view.state.round} is {view.state.phase}")

    # ---------------------------------------------------------------- events
    def next_event(self, timeout: float) -> Event | None:
        """Block until something concerns the running round, or return None after ``timeout``.

        Returns a :class:`PeerLost` (a member's key vanished, this agent's session
        lapsed, or the document moved past our round) or a :class:`JoinPending`
        (agents wait and there is room below ``max``). Each event is reported once.
        """
        self._check_running()
        deadline = time.monotonic() + timeout
        view = self._retry(self._observe, deadline, default=None)
        while view is not None:
            event = self._event(view)
            if event is not None and event != self._reported:
                self._reported = event
                self.log.info("event: %s", event)
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            view = self._retry(lambda v=view, r=remaining: self._wait_any(v, r), deadline,
                               default=None)
        return None

    def poll_event(self) -> Event | None:
        """Like :meth:`next_event` without blocking (one read; None when the store is down)."""
        self._check_running()
        try:
            view = self._observe()
        except KVUnavailable as exc:
            self.log.warning("poll: store unavailable: %s", exc)
            return None
        event = self._event(view)
        if event is None or event == self._reported:
            return None
        self._reported = event
        return event

    def _wait_any(self, view: View, remaining: float) -> View:
        self._store.wait(self._keys.prefix, view.index, remaining)
        return self._observe()

    def _event(self, view: View) -> Event | None:
        mine = self._assignment
        assert mine is not None
        state = view.state
        if self._lapsed.is_set():
            self._reopen(mine.round)
            return PeerLost(mine.round, (self._node,), "this agent's session lapsed")
        if state.round != mine.round or state.phase != CLOSED:
            return PeerLost(mine.round, (), f"round moved on to {state.round} ({state.phase})")
        alive = self._alive(view)
        gone = tuple(n for n in mine.nodes if n not in alive)
        if gone:
            return PeerLost(mine.round, gone, "membership key vanished or was re-created")
        ranks = state.rank_of
        waiting = tuple(n for n in state.waiting if n in view.members and n not in ranks)
        if waiting and len(ranks) < effective(state, self._limits).max_nodes:
            return JoinPending(mine.round, waiting)
        return None

    # ---------------------------------------------------------- round control
    def request_new_round(self) -> None:
        """Reopen our closed round so waiting agents get in (idempotent; call at a safe point)."""
        self._check_running()
        assert self._assignment is not None
        self._retry(lambda: self._reopen(self._assignment.round), time.monotonic() + 60.0)

    def _reopen(self, round_: int) -> None:
        """CAS the document from closed ``round_`` to the next open round (no-op if it moved on)."""
        while True:
            view = self._observe()
            state = view.state
            if state.round != round_ or state.phase != CLOSED:
                return
            if self._cas(reopen(state), view.doc_index):
                self.log.info("reopened: next round %d", state.round + 1)
                return

    def leave(self) -> None:
        """Destroy the session (our key vanishes at once) and stop the keepalive."""
        if self._left:
            return
        self._left = True
        self._session.close()
        self.log.info("left")

    def _stop_keepalive(self) -> None:
        """Stop renewing without destroying the session (tests: a hung agent)."""
        self._session.stop_keepalive()

    # -------------------------------------------------------------- plumbing
    def _observe(self) -> View:
        listing = self._store.list(self._keys.prefix)
        doc: KVEntry | None = None
        members: dict[str, KVEntry] = {}
        for entry in listing.entries:
            if entry.key == self._keys.state:
                doc = entry
            elif entry.key.startswith(self._keys.members):
                members[entry.key[len(self._keys.members):]] = entry
        self._state = RoundState.from_json(doc.value if doc else None)
        return View(self._state, doc.mod_index if doc else 0, members, listing.index)

    def _retry(self, fn: Callable[[], Any], deadline: float, **kw: Any) -> Any:
        """Call ``fn`` until it does not raise KVUnavailable; back off; stop at ``deadline``.

        With ``default`` given, return it at the deadline instead of raising.
        """
        backoff = Backoff()
        while True:
            try:
                try:
                    return fn()
                except SessionExpired as exc:
                    self.log.warning("session expired: %s", exc)
                    self._session.replace(self._session.id)
                    continue
            except KVUnavailable as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if "default" in kw:
                        return kw["default"]
                    raise RendezvousTimeout(
                        f"rendezvous of job {self.job!r} timed out for node {self._node!r}: "
                        f"store unavailable: {exc}") from exc
                delay = min(backoff.next(), remaining)
                self.log.warning("store unavailable (retry in %.2fs): %s", delay, exc)
                time.sleep(delay)

    def _check_open(self) -> None:
        if self._left:
            raise RendezvousClosed(f"node {self._node!r} left job {self.job!r}")

    def _check_running(self) -> None:
        self._check_open()
        if self._assignment is None:
            raise RuntimeError("call join() before waiting for events")
