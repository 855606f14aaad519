"""The data :func:`lattice.k8s.reconcile.reconcile` reads and writes: observations, actions, status.

Everything is a frozen dataclass of plain values, so the same core runs against the Kubernetes
API (``operator/lattice_operator``) and against local processes (``lattice local``): a caller
builds an :class:`Observed`, calls ``reconcile`` and applies the :class:`Plan`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

# pod phases as the operator sees them (a pod in phase Unknown is reported as Running, not ready)
PENDING, RUNNING, SUCCEEDED, FAILED = "Pending", "Running", "Succeeded", "Failed"
POD_PHASES = (PENDING, RUNNING, SUCCEEDED, FAILED)
# job phases (status.phase)
SCALING, RESTARTING = "Scaling", "Restarting"
PHASES = (PENDING, RUNNING, SCALING, RESTARTING, SUCCEEDED, FAILED)
TERMINAL = (SUCCEEDED, FAILED)
CHECKPOINTING_ANNOTATION = "exabits.ai/checkpointing"  # "true" while the agent checkpoints
LAST_CHECKPOINT_ANNOTATION = "exabits.ai/last-checkpoint"  # JSON {"step", "time", "url"}
ROUND_ANNOTATION = "exabits.ai/round"  # the rendezvous round the pod's agent runs in


def iso(t: float) -> str:
    """``t`` (seconds since the epoch) as an RFC 3339 UTC timestamp, as Kubernetes writes them."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 timestamp (``2024-01-02T03:04:05Z``) as seconds since the epoch; None stays None."""
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclasses.dataclass(frozen=True)
class Worker:
    """One worker pod (or local agent process) of the job, as observed.

    Attributes:
        name: ``<job>-worker-<index>``.
        index: the number in the name.
        phase: Pending, Running, Succeeded or Failed.
        ready: the pod's Ready condition.
        unschedulable_since: when the scheduler first said it cannot place the pod, or None.
        deleted_at: ``metadata.deletionTimestamp`` (deletion in progress), or None.
        checkpointing: the agent's ``exabits.ai/checkpointing`` annotation is "true".
        restart_count: container restarts the kubelet made (informational).
        message: why it ended (exit code, eviction), for events.
        last_checkpoint: the agent's ``exabits.ai/last-checkpoint`` annotation, parsed.
        round: the agent's ``exabits.ai/round`` annotation.
    """

    name: str
    index: int
    phase: str
    ready: bool = False
    unschedulable_since: float | None = None
    deleted_at: float | None = None
    checkpointing: bool = False
    restart_count: int = 0
    message: str = ""
    last_checkpoint: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    round: int | None = None

    @property
    def deleting(self) -> bool:
        """A deletion is in progress (the pod has a deletionTimestamp)."""
        return self.deleted_at is not None

    @property
    def live(self) -> bool:
        """Counts towards the job's size: Pending or Running and not being deleted."""
        return self.phase in (PENDING, RUNNING) and not self.deleting

    @property
    def mid_checkpoint(self) -> bool:
        """Running and writing a checkpoint: must not be deleted now (wait a cycle)."""
        return self.checkpointing and self.phase == RUNNING


@dataclasses.dataclass(frozen=True)
class Memory:
    """What reconcile remembers between calls beyond the status: the capacity limit.

    After giving up on unschedulable pods the job runs at most ``capped_at`` workers until
    ``gave_up_at + backoff`` (or until the spec changes: ``generation``), then tries to grow again;
    ``backoff`` doubles after each retry that fails (up to the spec's maximum) and is reset once
    the job runs at its desired size. Callers store it (the operator in an annotation on the job).
    """

    capped_at: int | None = None
    gave_up_at: float | None = None
    backoff: float = 0.0
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (camelCase, like the rest of the object)."""
        return {"cappedAt": self.capped_at, "gaveUpAt": self.gave_up_at, "backoff": self.backoff,
                "generation": self.generation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Memory:
        """The inverse of :meth:`to_dict`; a missing or malformed dict gives an empty memory."""
        if not isinstance(data, Mapping):
            return cls()
        try:
            capped, gave = data.get("cappedAt"), data.get("gaveUpAt")
            return cls(capped_at=None if capped is None else int(capped),
                       gave_up_at=None if gave is None else float(gave),
                       backoff=float(data.get("backoff") or 0.0), generation=int(data.get("generation") or 0))
        except (TypeError, ValueError):
            return cls()


@dataclasses.dataclass(frozen=True)
class Condition:
    """One entry of ``status.conditions``: type, "True"/"False", reason, message, since when."""

    type: str
    status: str
    reason: str
    message: str = ""
    last_transition: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The Kubernetes form (``lastTransitionTime`` as RFC 3339)."""
        return {"type": self.type, "status": self.status, "reason": self.reason,
                "message": self.message, "lastTransitionTime": iso(self.last_transition)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Condition:
        """Read one condition back from a status."""
        return cls(type=str(data.get("type", "")), status=str(data.get("status", "Unknown")),
                   reason=str(data.get("reason", "")), message=str(data.get("message", "")),
                   last_transition=parse_time(data.get("lastTransitionTime")) or 0.0)


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything reconcile needs besides the spec: the job's workers and its previous status.

    Attributes:
        workers: every pod of the job, whatever its phase (one per name).
        phase: the previous ``status.phase`` (None for a new job).
        restarts: the previous ``status.restarts`` (failed workers replaced so far).
        conditions: the previous ``status.conditions`` (their transition times are kept).
        last_checkpoint: the previous ``status.lastCheckpoint``.
        round: the previous ``status.round``.
        memory: what the previous plan asked to remember.
    """

    workers: tuple[Worker, ...] = ()
    phase: str | None = None
    restarts: int = 0
    conditions: tuple[Condition, ...] = ()
    last_checkpoint: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    round: int | None = None
    memory: Memory = Memory()

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None, workers: tuple[Worker, ...] = (),
                    memory: Memory | None = None) -> Observed:
        """Build from a stored ``status`` dict (as the API or ``lattice local`` keeps it)."""
        status = status or {}
        return cls(workers=tuple(workers), phase=status.get("phase"), restarts=int(status.get("restarts") or 0),
                   conditions=tuple(Condition.from_dict(c) for c in status.get("conditions") or ()),
                   last_checkpoint=status.get("lastCheckpoint"), round=status.get("round"),
                   memory=memory or Memory())


@dataclasses.dataclass(frozen=True)
class CreateWorker:
    """Create the worker with this index (pod ``<job>-worker-<index>``, from render.pod)."""

    index: int


@dataclasses.dataclass(frozen=True)
class DeleteWorker:
    """Delete a worker. ``graceful``: SIGTERM and the pod's grace period, so the agent checkpoints
    at the next step and leaves; otherwise delete at once (grace 0: it never ran or already ended)."""

    name: str
    graceful: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class EmitEvent:
    """Post a Kubernetes Event on the job: ``type`` Normal or Warning, a CamelCase reason."""

    type: str
    reason: str
    message: str


Action = CreateWorker | DeleteWorker | EmitEvent


@dataclasses.dataclass(frozen=True)
class Status:
    """The job's status to write (``to_dict`` gives the ``status`` subresource's content)."""

    phase: str
    replicas: int
    ready_replicas: int
    restarts: int
    conditions: tuple[Condition, ...]
    observed_generation: int
    selector: str
    last_checkpoint: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    round: int | None = None
    live_replicas: int = 0  # workers Pending or Running (for `lattice local get`; not in the CRD)

    def to_dict(self) -> dict[str, Any]:
        """The CRD's status fields in camelCase (absent values are left out)."""
        out: dict[str, Any] = {
            "phase": self.phase, "replicas": self.replicas, "readyReplicas": self.ready_replicas,
            "restarts": self.restarts, "conditions": [c.to_dict() for c in self.conditions],
            "observedGeneration": self.observed_generation, "selector": self.selector}
        if self.last_checkpoint is not None:
            out["lastCheckpoint"] = dict(self.last_checkpoint)
        if self.round is not None:
            out["round"] = self.round
        return out

    def condition(self, type_: str) -> Condition | None:
        """The condition of this type, if any."""
        return next((c for c in self.conditions if c.type == type_), None)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The outcome of one reconcile: actions to apply in order, the status to write, the memory
    to keep, and when to reconcile again at the latest (seconds; None: on the next change)."""

    actions: tuple[Action, ...]
    status: Status
    memory: Memory
    requeue_after: float | None = None

    @property
    def creates(self) -> list[CreateWorker]:
        """The CreateWorker actions."""
        return [a for a in self.actions if isinstance(a, CreateWorker)]

    @property
    def deletes(self) -> list[DeleteWorker]:
        """The DeleteWorker actions."""
        return [a for a in self.actions if isinstance(a, DeleteWorker)]

    @property
    def events(self) -> list[EmitEvent]:
        """The EmitEvent actions."""
        return [a for a in self.actions if isinstance(a, EmitEvent)]
