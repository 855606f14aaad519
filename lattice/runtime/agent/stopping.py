"""Planned stops agreed by every agent of a round, so all ranks checkpoint the same step.

Rank 0 commits a checkpoint only when every rank's part of that step is in, so a planned stop
(SIGTERM, scale up, scale down) must end every rank at one step, and no rank may have passed
it already: a step a rank completed beyond it would be redone after the restart. An agent
only sees its own workers' steps, and the ranks of a job need not be in lockstep (workers
that do not synchronise every step drift apart by seconds), so the step is agreed in two
phases on one record in the store (``lattice/<job>/stop/<round>``):

1. every agent of the round, as it learns of the stop, holds its workers at its proposal
   (its furthest worker plus a margin and the steps made in ``lead_time`` seconds), then
   merges the proposal into the record with compare-and-set (``at`` is the maximum of all
   proposals, ``acks`` the agents that merged) and raises its hold to the record's ``at``;
2. once every member of the round has acknowledged, ``at`` is final: each agent tells its
   workers to checkpoint there and exit. A worker that reached its hold waits (a step or two
   at most, in practice none) until then.

No worker can pass the final step: each was held at or below it before its agent's proposal
was merged. If the store is unreachable, the agent stops at the best step it knows (with a
checkpoint, as the others will when they cannot reach it either). If a member
never acknowledges within ``timeout`` (it died, and its session has not expired yet), its ranks'
parts can never arrive, so no checkpoint of that step could commit: the record comes back
without ``complete`` and the agent stops its workers without waiting for one (the restart
resumes from the newest committed checkpoint, as after any failure).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..kv.api import CASConflict, KVEntry, KVStore, KVUnavailable
from .workers import WorkerGroup

LEAD_TIME = 0.5  # seconds of steps allowed for the announcement to reach the other agents


class StopAgreement:
    """This agent's side of one round's planned-stop record."""

    def __init__(self, store: KVStore, key: str, node: str, members: tuple[str, ...], log: Any,
                 members_prefix: str | None = None):
        self.store, self.key, self.node, self.members, self.log = store, key, node, members, log
        self.members_prefix = members_prefix  # + node: a member's registration; gone means it left

    def join(self, group: WorkerGroup, leaving: bool) -> dict[str, Any]:
        """Hold the workers at this agent's proposal and merge it into the record; returns the record."""
        proposal = group.stop_step(lead_time=LEAD_TIME)
        group.hold(proposal)
        record: dict[str, Any] = {"at": proposal, "by": self.node, "leaving": [], "acks": []}
        for _ in range(100):
            try:
                stored, entry = read_record(self.store, self.key)
                record = stored or record
                merged = self._merge(record, proposal, leaving)
                if merged == record and entry is not None:
                    break
                self.store.cas(self.key, json.dumps(merged).encode(), entry.mod_index if entry else 0)
                record = merged
                break
            except CASConflict:
                continue
            except KVUnavailable as exc:
                self.log.warning("cannot agree on the stop step with the other agents (%s); stopping locally", exc)
                record = self._merge(record, proposal, leaving)
                record["acks"] = list(self.members)  # nobody to wait for: assume they all stop there too
                break
        group.hold(record["at"])
        return record

    def _merge(self, record: dict[str, Any], proposal: int, leaving: bool) -> dict[str, Any]:
        merged = {**record, "at": max(record["at"], proposal), "leaving": list(record["leaving"]),
                  "acks": list(record["acks"])}
        if self.node not in merged["acks"]:
            merged["acks"].append(self.node)
        if leaving and self.node not in merged["leaving"]:
            merged["leaving"].append(self.node)
        return merged

    def settle(self, record: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Wait (bounded) until every member of the round has acknowledged; returns the final record,
        with ``complete`` False if some member never did."""
        deadline, index, store_down = time.monotonic() + timeout, 0, False
        while not set(self.members) <= set(record["acks"]):
            left = deadline - time.monotonic()
            if left <= 0:
                if store_down:  # as in join(): stop at the best step known, with a checkpoint
                    self.log.warning("the store is unreachable; stopping at step %d without every agent's "
                                     "answer", record["at"])
                    break
                missing = sorted(set(self.members) - set(record["acks"]))
                self.log.warning("agents %s did not acknowledge the planned stop within %.0fs (gone?): no "
                                 "checkpoint of step %d can commit without their ranks; stopping the workers "
                                 "without one", missing, timeout, record["at"])
                return {**record, "complete": False}
            try:
                index = self.store.wait(self.key, index, min(2.0, left)).index
                record = read_record(self.store, self.key)[0] or record
                store_down = False
                gone = self._gone(set(self.members) - set(record["acks"]))
                if gone:
                    self.log.warning("agents %s left without acknowledging the planned stop: no checkpoint of "
                                     "step %d can commit without their ranks; stopping the workers without one",
                                     gone, record["at"])
                    return {**record, "complete": False}
            except KVUnavailable:
                store_down = True
                time.sleep(min(0.5, max(left, 0.0)))
        return {**record, "complete": True}

    def _gone(self, members: set[str]) -> list[str]:
        """Those of ``members`` whose registration is gone (they left or their session expired)."""
        if self.members_prefix is None:
            return []
        return sorted(n for n in members if self.store.get(self.members_prefix + n) is None)


def read_record(store: KVStore, key: str) -> tuple[dict[str, Any] | None, KVEntry | None]:
    """The stop record at ``key`` and its store entry; (None, None) if there is none yet."""
    entry = store.get(key)
    if entry is None:
        return None, None
    record = json.loads(entry.value)
    record.setdefault("acks", [])
    return record, entry


def await_leavers(store: KVStore, stop_key: str, members_prefix: str, timeout: float, log: Any) -> None:
    """Before rejoining, wait until the agents leaving after a planned stop are gone, so the next
    round is formed without them (a blocking watch on the members, bounded)."""
    deadline, index, present = time.monotonic() + timeout, 0, []
    while time.monotonic() < deadline:
        try:
            record = read_record(store, stop_key)[0]
            leaving = record["leaving"] if record else []
            present = [n for n in leaving if store.get(f"{members_prefix}{n}") is not None]
            if not present:
                return
            index = store.wait(members_prefix, index, min(2.0, deadline - time.monotonic())).index
        except KVUnavailable:
            time.sleep(0.5)
    log.warning("agents %s announced they leave but are still registered; rejoining anyway", present)
