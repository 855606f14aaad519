"""The Kubernetes objects of a TrainingJob, as plain dicts: worker pods and the headless Service.

A worker pod is the user's pod template with the agent injected: the training container's
``command`` + ``args`` run under ``lattice agent --no-python -- <command>``, whose flags read the
job's settings from the container's environment (``$(LATTICE_MIN_SIZE)`` and so on, expanded by
the kubelet), so ``kubectl describe pod`` shows every setting once, by name. The pod also gets:

- labels ``exabits.ai/job``, ``exabits.ai/worker-index``, ``exabits.ai/role: worker`` (the
  selector of the Service and of ``status.selector``), plus the template's labels;
- an owner reference to the TrainingJob (``controller: true``), so deleting the job deletes
  its pods and Service;
- the stable name ``<job>-worker-<index>``, ``hostname``/``subdomain`` for the headless Service
  (DNS ``<job>-worker-<index>.<job>.<namespace>.svc``);
- ``restartPolicy: Never`` (the agent restarts training processes; the operator replaces pods);
- ``terminationGracePeriodSeconds`` (template value, default 180) that leaves the agent
  ``grace - 30`` seconds to checkpoint at the next step after SIGTERM, and 30 to leave.

The training container is the one named ``trainingjob``, else the first; it needs a ``command``
(the operator cannot see an image's entrypoint).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ..core.errors import ConfigError
from .reconcile import worker_name
from .spec import API_VERSION, INDEX_LABEL, JOB_LABEL, KIND, ROLE_LABEL, JobSpec

DEFAULT_GRACE = 180  # seconds: SIGTERM -> checkpoint at the next step -> leave the rendezvous
LEAVE_TIME = 30  # seconds of the grace period kept for leaving after the workers stopped
CONTAINER = "trainingjob"
MANAGED_BY = {"app.kubernetes.io/managed-by": "lattice-operator", "app.kubernetes.io/name": "lattice"}
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def owner_reference(spec: JobSpec) -> dict[str, Any]:
    """The owner reference to the TrainingJob that makes the garbage collector delete children."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": spec.name, "uid": spec.uid,
            "controller": True, "blockOwnerDeletion": True}


def _check_name(spec: JobSpec) -> None:
    longest = worker_name(spec.name, max(spec.max_size - 1, 0))
    if not _LABEL.match(spec.name) or len(longest) > 63:
        raise ConfigError(f"metadata.name {spec.name!r}: a TrainingJob's name must be a DNS label (lowercase "
                          f"letters, digits and '-', starting with a letter) short enough that "
                          f"{longest!r} has at most 63 characters, as pod hostnames need")


def _labels(spec: JobSpec, index: int | None = None) -> dict[str, str]:
    labels = {**MANAGED_BY, JOB_LABEL: spec.name, ROLE_LABEL: "worker"}
    if index is not None:
        labels[INDEX_LABEL] = str(index)
    return labels


def _env(spec: JobSpec, index: int, grace: int) -> list[dict[str, Any]]:
    rdzv = spec.rendezvous
    if rdzv is None or (rdzv.endpoint is None):
        raise ConfigError(f"spec.rendezvous.endpoint is needed on a cluster (backend "
                          f"{rdzv.backend if rdzv else 'unset'}): point it at Consul, etcd or "
                          "`lattice rendezvous serve`, or leave spec.rendezvous out to use the operator's")
    ck = spec.checkpoint
    values: dict[str, Any] = {
        "LATTICE_JOB": spec.name, "LATTICE_NAMESPACE": spec.namespace, "LATTICE_WORKER_INDEX": index,
        "LATTICE_MIN_SIZE": spec.min_size, "LATTICE_MAX_SIZE": spec.max_size,
        "LATTICE_SPEC_GENERATION": spec.generation or None,  # newer min/max reach running agents
        "LATTICE_NPROC_PER_NODE": spec.nproc_per_node, "LATTICE_MAX_RESTARTS": spec.max_restarts,
        "LATTICE_RDZV_BACKEND": rdzv.backend, "LATTICE_RDZV_ENDPOINT": rdzv.endpoint,
        "LATTICE_AGENT_GRACE": max(1, grace - LEAVE_TIME),
        "LATTICE_CHECKPOINT_URL": ck.url, "LATTICE_CHECKPOINT_DIR": ck.url,
        "LATTICE_EVERY_STEPS": ck.every_steps, "LATTICE_EVERY_SECONDS": ck.every_seconds,
        "LATTICE_KEEP": ck.keep}
    env = [{"name": k, "value": str(v)} for k, v in values.items() if v is not None]
    env += [{"name": "LATTICE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "LATTICE_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    return env


METRICS_PORT = 9400  # the agent's Prometheus metrics; the operator reads checkpointing/round from it

AGENT_FLAGS = [
    "--nnodes", "$(LATTICE_MIN_SIZE):$(LATTICE_MAX_SIZE)",
    "--nproc-per-node", "$(LATTICE_NPROC_PER_NODE)",
    "--max-restarts", "$(LATTICE_MAX_RESTARTS)",
    "--rdzv-backend", "$(LATTICE_RDZV_BACKEND)",
    "--rdzv-endpoint", "$(LATTICE_RDZV_ENDPOINT)",
    "--rdzv-id", "$(LATTICE_JOB)",
    "--node-addr", "$(LATTICE_POD_IP)",
    "--grace", "$(LATTICE_AGENT_GRACE)",
    "--metrics-port", str(METRICS_PORT), "--metrics-addr", "0.0.0.0",
]


def _training_container(containers: list[dict[str, Any]]) -> int:
    return next((i for i, c in enumerate(containers) if c.get("name") == CONTAINER), 0)


def _inject(container: dict[str, Any], env: list[dict[str, Any]], where: str) -> dict[str, Any]:
    command = list(container.get("command") or [])
    if not command:
        raise ConfigError(f"{where}.command is required: the operator runs it under `lattice agent` "
                          "and cannot see the image's entrypoint")
    ours = {e["name"] for e in env}
    out = dict(container)
    out["command"] = ["lattice", "agent", *AGENT_FLAGS, "--no-python", "--", *command,
                      *(container.get("args") or [])]
    out.pop("args", None)
    out["env"] = [e for e in container.get("env") or [] if e.get("name") not in ours] + env
    ports = [p for p in container.get("ports") or [] if p.get("containerPort") != METRICS_PORT]
    out["ports"] = ports + [{"name": "lattice-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    return out


def pod(spec: JobSpec, index: int) -> dict[str, Any]:
    """The worker pod ``<job>-worker-<index>`` (a core/v1 Pod as a dict)."""
    _check_name(spec)
    template = copy.deepcopy(spec.template)
    meta, pod_spec = template.get("metadata") or {}, template["spec"]
    grace = int(pod_spec.get("terminationGracePeriodSeconds") or DEFAULT_GRACE)
    containers = list(pod_spec["containers"])
    i = _training_container(containers)
    containers[i] = _inject(containers[i], _env(spec, index, grace),
                            f"spec.replicaSpecs.template.spec.containers[{i}]")
    name = worker_name(spec.name, index)
    pod_spec.update(containers=containers, restartPolicy="Never", hostname=name, subdomain=spec.name,
                    terminationGracePeriodSeconds=grace)
    metadata: dict[str, Any] = {
        "name": name, "namespace": spec.namespace,
        "labels": {**(meta.get("labels") or {}), **_labels(spec, index)},
        "ownerReferences": [owner_reference(spec)]}
    if meta.get("annotations"):
        metadata["annotations"] = dict(meta["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def service(spec: JobSpec) -> dict[str, Any]:
    """The headless Service ``<job>`` that gives each worker pod a DNS name (ready or not)."""
    _check_name(spec)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec),
                     "ownerReferences": [owner_reference(spec)]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {JOB_LABEL: spec.name, ROLE_LABEL: "worker"}}}
