"""What the local controller sees, in the reconcile core's terms (:class:`lattice.k8s.Worker`).

A cluster's kubelet and API server say a pod's phase and readiness; here they come from the
agent process and the job's rendezvous store:

- phase: the process runs -> Running; it exited 0 -> Succeeded; any other exit -> Failed;
- ready: the agent holds a rank in the current (closed) rendezvous round, i.e. its workers run;
- checkpointing: the current round has a planned stop under way (its ``stop/<round>`` key is
  set) and the agent is in that round; bounded by the grace period, so a stop that never ends
  cannot block deletions for ever;
- round: the rendezvous round the agent holds a rank in;
- last checkpoint: the newest committed checkpoint in the local checkpoint directory.

An agent's node name is ``<host>-<pid>-<random>``, which ties rendezvous members to processes.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..k8s.model import FAILED, RUNNING, SUCCEEDED, Worker, iso


@dataclasses.dataclass
class PodRecord:
    """One local worker "pod": its agent process and what the controller did to it."""

    index: int
    name: str
    pid: int
    started: int | None  # /proc start time (guards against a reused pid)
    created: float  # wall-clock time of the start
    exit_code: int | None = None  # set once the process ended (negative: killed by that signal)
    deleted_at: float | None = None  # when the controller asked it to stop
    grace: float = 180.0  # seconds a graceful stop may take before SIGKILL

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PodRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """The parts of the job's rendezvous state the controller reads (``lattice/<job>/...``)."""

    round: int | None = None
    closed: bool = False
    ranks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    stop_rounds: frozenset[int] = frozenset()
    agent_restarts: int = 0

    @classmethod
    def from_entries(cls, job: str, entries: Mapping[str, bytes]) -> Rendezvous:
        """Parse a ``list("lattice/<job>/")`` of the store (key -> value)."""
        prefix = f"lattice/{job}/"
        state = entries.get(prefix + "state")
        doc = json.loads(state) if state else {}
        stops = frozenset(int(k.rsplit("/", 1)[1]) for k in entries
                          if k.startswith(prefix + "stop/") and k.rsplit("/", 1)[1].isdigit())
        raw_restarts = entries.get(prefix + "restarts")
        return cls(round=doc.get("round"), closed=doc.get("phase") == "closed",
                   ranks={str(n): int(r) for n, r in doc.get("ranks") or ()}, stop_rounds=stops,
                   agent_restarts=int(raw_restarts) if raw_restarts else 0)

    def round_of(self, pid: int) -> int | None:
        """The round in which the agent with this pid holds a rank (None: not in a running round)."""
        if not self.closed:
            return None
        return self.round if any(node_pid(n) == pid for n in self.ranks) else None


def node_pid(node: str) -> int | None:
    """The pid in an agent's node name ``<host>-<pid>-<random>`` (None if it has another form)."""
    parts = node.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def exit_message(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``, for events."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def worker(pod: PodRecord, rdzv: Rendezvous, stop_seen: Mapping[int, float], now: float, grace: float) -> Worker:
    """The reconcile core's view of one local pod."""
    if pod.exit_code is None:
        phase, message = RUNNING, ""
    else:
        phase, message = (SUCCEEDED if pod.exit_code == 0 else FAILED), exit_message(pod.exit_code)
    round_ = rdzv.round_of(pod.pid) if phase == RUNNING else None
    since = stop_seen.get(round_) if round_ is not None and round_ in rdzv.stop_rounds else None
    checkpointing = since is not None and now - since < grace
    return Worker(name=pod.name, index=pod.index, phase=phase, ready=round_ is not None,
                  deleted_at=pod.deleted_at, checkpointing=checkpointing, message=message, round=round_)


def newest_checkpoint(directory: str) -> dict[str, Any] | None:
    """``{"step", "time", "url"}`` of the newest committed checkpoint in a local directory."""
    if "://" in directory or not Path(directory).is_dir():
        return None
    from ..core import inspect
    from ..core.storage import LocalDirectory

    try:
        committed = LocalDirectory(Path(directory)).committed()  # newest first
    except (OSError, ValueError):
        return None
    if not committed:
        return None
    step, path = committed[0]
    try:
        when = inspect.read_manifest(path)["wall_time"]
    except Exception:  # a damaged manifest: its directory's time will do
        when = path.stat().st_mtime
    return {"step": int(step), "time": iso(float(when)), "url": str(path)}
