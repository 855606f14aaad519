"""Build reconcile's :class:`Observed` from Kubernetes objects given as dicts (camelCase, as the
API returns them): the TrainingJob and its pods. Pure, so the kopf layer stays thin and the
translation is tested without a cluster.

A pod belongs to the job when it carries the job's label and (if the job has a uid) an owner
reference to it. Pod phase ``Unknown`` (node lost) reads as Running and not ready; a pending pod
whose ``PodScheduled`` condition is False with reason ``Unschedulable`` is unschedulable since
that condition's transition time.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .model import (
    CHECKPOINTING_ANNOTATION,
    FAILED,
    LAST_CHECKPOINT_ANNOTATION,
    POD_PHASES,
    ROUND_ANNOTATION,
    RUNNING,
    Memory,
    Observed,
    Worker,
    iso,
    parse_time,
)
from .spec import INDEX_LABEL, JOB_LABEL

log = logging.getLogger("lattice")
MEMORY_ANNOTATION = "exabits.ai/reconcile-memory"  # reconcile's Memory, as JSON, on the job


def _condition(pod: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or () if c.get("type") == type_), None)


def _failure_message(status: Mapping[str, Any]) -> str:
    parts = [str(status[k]) for k in ("reason", "message") if status.get(k)]
    for cs in status.get("containerStatuses") or ():
        term = (cs.get("state") or {}).get("terminated") or {}
        if term.get("exitCode"):
            parts.append(f"{cs.get('name')} exited with {term['exitCode']}"
                         + (f" ({term['reason']})" if term.get("reason") else ""))
    return "; ".join(parts)


def _json_annotation(annotations: Mapping[str, str], key: str) -> Any:
    raw = annotations.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("ignoring annotation %s=%r: not JSON", key, raw)
        return None


def worker_from_pod(pod: Mapping[str, Any]) -> Worker | None:
    """The :class:`Worker` a pod dict describes, or None if it has no worker index."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    try:
        index = int(labels.get(INDEX_LABEL, str(meta.get("name", "")).rsplit("-", 1)[-1]))
    except ValueError:
        return None
    phase = status.get("phase") or "Pending"
    phase = phase if phase in POD_PHASES else RUNNING  # Unknown: the node is unreachable
    ready = _condition(pod, "Ready")
    scheduled = _condition(pod, "PodScheduled")
    since = None
    if scheduled is not None and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        since = parse_time(scheduled.get("lastTransitionTime") or meta.get("creationTimestamp"))
    checkpoint = _json_annotation(annotations, LAST_CHECKPOINT_ANNOTATION)
    round_ = _json_annotation(annotations, ROUND_ANNOTATION)
    return Worker(
        name=str(meta.get("name")), index=index, phase=phase,
        ready=status.get("phase") == RUNNING and ready is not None and ready.get("status") == "True",
        unschedulable_since=since,
        deleted_at=parse_time(meta.get("deletionTimestamp")),
        checkpointing=str(annotations.get(CHECKPOINTING_ANNOTATION, "")).lower() == "true",
        restart_count=sum(int(cs.get("restartCount") or 0) for cs in status.get("containerStatuses") or ()),
        message=_failure_message(status) if phase == FAILED else "",
        last_checkpoint=checkpoint if isinstance(checkpoint, Mapping) else None,
        round=round_ if isinstance(round_, int) else None)


_METRIC = re.compile(r"^lattice_(checkpointing|last_committed_step|last_committed_time|round)\{[^}]*\}\s+(\S+)$")


def annotations_from_metrics(text: str, url: str | None = None) -> dict[str, str]:
    """The agent's Prometheus metrics (``--metrics-port``) as the worker annotations reconcile reads:
    mid-checkpoint (a planned stop under way), the last committed checkpoint, the round."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if m := _METRIC.match(line.strip()):
            try:
                values[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    out: dict[str, str] = {}
    if "checkpointing" in values:
        out[CHECKPOINTING_ANNOTATION] = "true" if values["checkpointing"] >= 1 else "false"
    if values.get("round") is not None:
        out[ROUND_ANNOTATION] = str(int(values["round"]))
    if values.get("last_committed_time"):
        ckpt: dict[str, Any] = {"step": int(values.get("last_committed_step", 0)),
                                "time": iso(values["last_committed_time"])}
        if url:
            ckpt["url"] = url
        out[LAST_CHECKPOINT_ANNOTATION] = json.dumps(ckpt)
    return out


def with_agent_status(pod: Mapping[str, Any], metrics_text: str | None, url: str | None = None) -> dict[str, Any]:
    """``pod`` with the annotations its agent's metrics give (pod annotations set by hand win)."""
    out = dict(pod)
    if not metrics_text:
        return out
    meta = dict(pod.get("metadata") or {})
    meta["annotations"] = {**annotations_from_metrics(metrics_text, url), **(meta.get("annotations") or {})}
    out["metadata"] = meta
    return out


def owned_by(pod: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """The pod carries the job's label and, when the job has a uid, an owner reference to it."""
    meta, job_meta = pod.get("metadata") or {}, job.get("metadata") or {}
    if (meta.get("labels") or {}).get(JOB_LABEL) != job_meta.get("name"):
        return False
    uid = job_meta.get("uid")
    return not uid or any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or ())


def observed_from(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> Observed:
    """The job's previous status and memory plus the workers among ``pods``."""
    workers = [w for w in (worker_from_pod(p) for p in pods if owned_by(p, job)) if w is not None]
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    memory = Memory.from_dict(_json_annotation(annotations, MEMORY_ANNOTATION))
    return Observed.from_status(job.get("status"), tuple(sorted(workers, key=lambda w: w.index)), memory)
