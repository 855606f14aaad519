"""kopf handlers for ``trainingjobs.exabits.ai/v1``: observe, call ``lattice.k8s.reconcile``, apply.

Every trigger (job created/resumed/spec changed, a periodic timer, any event of a worker pod)
runs the same :func:`reconcile_job`: read the job and its pods, build ``Observed``, call the pure
``reconcile``, apply its actions (create pods, delete pods, post Events), then write the status
and the reconcile memory (an annotation) when they changed. All decisions live in
``lattice/k8s/reconcile.py``; this module only moves data (and, when min/max were edited, hands
the new limits to the running agents: limits.py). One lock per job keeps concurrent
triggers from planning on the same observation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf

from lattice.core.errors import ConfigError
from lattice.k8s import (
    CreateWorker,
    DeleteWorker,
    EmitEvent,
    Plan,
    RendezvousSpec,
    parse_job,
    reconcile,
)
from lattice.k8s.model import iso
from lattice.k8s.observe import MEMORY_ANNOTATION, observed_from
from lattice.k8s.render import pod, service
from lattice.k8s.spec import GROUP, JOB_LABEL, PLURAL, VERSION

from .cluster import Cluster
from .limits import publish_if_stale

log = logging.getLogger("lattice.operator")
INTERVAL = float(os.environ.get("LATTICE_OPERATOR_INTERVAL", "10"))  # seconds between timer reconciles
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
_cluster: Cluster | None = None


def cluster() -> Cluster:
    """The shared API access (created on first use, after kopf or the tests configured the client)."""
    global _cluster
    if _cluster is None:
        _cluster = Cluster()
    return _cluster


def default_rendezvous() -> RendezvousSpec:
    """The operator's rendezvous for jobs without ``spec.rendezvous``: the Consul of deploy/."""
    ns = os.environ.get("LATTICE_OPERATOR_NAMESPACE", "lattice")
    return RendezvousSpec(backend=os.environ.get("LATTICE_RENDEZVOUS_BACKEND", "consul"),
                          endpoint=os.environ.get("LATTICE_RENDEZVOUS_ENDPOINT", f"http://consul.{ns}.svc:8500"))


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def reconcile_job(namespace: str, name: str, api: Cluster | None = None, now: float | None = None) -> Plan | None:
    """Reconcile one job end to end; returns the plan applied (None if the job is gone)."""
    api = api or cluster()
    with _lock(namespace, name):
        job = api.get_job(namespace, name)
        if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
            return None
        try:
            spec = parse_job(job, default_rendezvous())
            pod(spec, 0), service(spec)  # render errors are spec errors: report them now
        except ConfigError as exc:
            _invalid(api, job, exc)
            raise kopf.PermanentError(str(exc)) from None
        pods = api.with_agent_status(api.list_pods(namespace, name), spec.checkpoint.url)  # checkpointing, ...
        plan = reconcile(spec, observed_from(job, pods), now or time.time())
        _apply(api, job, spec, plan)
        publish_if_stale(spec, pods)  # edited min/max reach the running agents (limits.py)
        return plan


def _apply(api: Cluster, job: Mapping[str, Any], spec: Any, plan: Plan) -> None:
    meta = job["metadata"]
    if plan.creates:
        api.create(service(spec))
    for action in plan.actions:
        if isinstance(action, CreateWorker):
            if not api.create(pod(spec, action.index)):
                log.info("worker %d of %s/%s exists already", action.index, spec.namespace, spec.name)
        elif isinstance(action, DeleteWorker):
            api.delete_pod(spec.namespace, action.name, action.graceful)
        elif isinstance(action, EmitEvent):
            api.post_event(job, action.type, action.reason, action.message)
    status = plan.status.to_dict()
    current = {k: v for k, v in (job.get("status") or {}).items() if k in status}
    if current != status:
        api.patch_status(spec.namespace, spec.name, status)
    memory = json.dumps(plan.memory.to_dict(), sort_keys=True)
    if (meta.get("annotations") or {}).get(MEMORY_ANNOTATION) != memory:
        api.annotate_job(spec.namespace, spec.name, {MEMORY_ANNOTATION: memory})


def _invalid(api: Cluster, job: Mapping[str, Any], exc: ConfigError) -> None:
    meta = job["metadata"]
    api.post_event(job, "Warning", "InvalidSpec", str(exc))
    now = iso(time.time())
    api.patch_status(meta["namespace"], meta["name"], {
        "phase": "Failed", "observedGeneration": meta.get("generation"),
        "conditions": [{"type": "Failed", "status": "True", "reason": "InvalidSpec", "message": str(exc),
                        "lastTransitionTime": now}]})


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Standalone (one replica, no peering); post only warnings of kopf's own logs as Events."""
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = f"{GROUP}/operator"


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_job(namespace: str, name: str, **_: Any) -> None:
    """A job appeared, the operator restarted, or its spec changed (e.g. ``kubectl scale``)."""
    reconcile_job(namespace, name)


@kopf.timer(GROUP, VERSION, PLURAL, interval=INTERVAL, initial_delay=INTERVAL)
def on_timer(namespace: str, name: str, **_: Any) -> None:
    """Periodic reconcile: timeouts (unschedulable pods), backoff retries, deferred deletions."""
    reconcile_job(namespace, name)


@kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT})
def on_pod(namespace: str, labels: Mapping[str, str], type: str | None = None, **_: Any) -> None:
    """A worker pod changed (scheduled, ready, failed, succeeded, deleted): reconcile its job."""
    if type is None:  # the initial listing: the resume handler covers existing jobs
        return
    try:
        reconcile_job(namespace, labels[JOB_LABEL])
    except kopf.PermanentError:
        pass  # reported on the job by the job's own handlers
