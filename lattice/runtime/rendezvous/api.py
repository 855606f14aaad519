"""What the rendezvous hands to its caller: assignments, events and errors.

:class:`~lattice.runtime.rendezvous.handler.RendezvousHandler` turns the pure
decisions of :mod:`~lattice.runtime.rendezvous.decide` into store operations;
this module holds only the values it returns and raises, so the agent can
import them without the store machinery.

Store layout (under ``lattice/<job>/``):

* ``state`` - the round document (:class:`~lattice.runtime.rendezvous.decide.RoundState`
  as JSON), changed only by compare-and-set on its modify index;
* ``members/<node>`` - one key per live agent, bound to the agent's session, whose
  value is JSON ``{"addr", "port", "info"}``. The key existing *is* the agent's
  request to take part; it vanishes when the session is destroyed or lapses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lattice.runtime.kv.api import validate_key


class RendezvousError(Exception):
    """Base class of the rendezvous errors."""


class RendezvousTimeout(RendezvousError, TimeoutError):
    """``join`` did not reach a closed round in time (names job, min and the nodes seen)."""


class RendezvousClosed(RendezvousError):
    """The handler was used after :meth:`RendezvousHandler.leave`."""


@dataclass(frozen=True)
class Member:
    """One agent of a round: where its rank-0 rendezvous (``MASTER_ADDR``) would listen."""

    node: str
    addr: str
    port: int
    info: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> bytes:
        return json.dumps({"addr": self.addr, "port": self.port, "info": self.info},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, node: str, raw: bytes) -> Member:
        try:
            d = json.loads(raw or b"{}")
        except ValueError:
            d = {}
        return cls(node, str(d.get("addr", "")), int(d.get("port", 0)), dict(d.get("info") or {}))


@dataclass(frozen=True)
class Assignment:
    """This agent's place in a closed round.

    Attributes:
        round: the round number (rises by one each time a round reopens).
        rank: this agent's group rank, ``0..world-1``.
        world: the number of agents in the round.
        members: every agent of the round, ordered by rank.
    """

    round: int
    rank: int
    world: int
    members: tuple[Member, ...]

    @property
    def master(self) -> Member:
        """The rank-0 member (``MASTER_ADDR``/``MASTER_PORT``)."""
        return self.members[0]

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names ordered by rank."""
        return tuple(m.node for m in self.members)


@dataclass(frozen=True)
class PeerLost:
    """The running round is over: ``nodes`` left (their keys vanished) or the round moved on."""

    round: int
    nodes: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class JoinPending:
    """Agents ``nodes`` wait to join and the round has room: call ``request_new_round`` at a safe point."""

    round: int
    nodes: tuple[str, ...]


Event = PeerLost | JoinPending


class Keys:
    """The store keys of one job."""

    def __init__(self, job: str) -> None:
        if not job or "/" in job:
            raise ValueError(f"job name {job!r} must be non-empty and contain no '/'")
        self.prefix = validate_key(f"lattice/{job}/", prefix=True)
        self.state = self.prefix + "state"
        self.members = self.prefix + "members/"

    def member(self, node: str) -> str:
        if not node or "/" in node:
            raise ValueError(f"node name {node!r} must be non-empty and contain no '/'")
        return validate_key(self.members + node)
