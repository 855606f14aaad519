"""The few Kubernetes API calls the operator makes, through the ``kubernetes`` client.

Everything is plain dicts in and out (camelCase, as on the wire), so the pure core in
``lattice.k8s`` never sees client models. Calls that race with the cluster are idempotent:
creating a pod or Service that exists (409) and deleting one that is gone (404) are no-ops.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
import urllib.request
import uuid
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lattice.k8s.model import iso
from lattice.k8s.observe import with_agent_status
from lattice.k8s.render import METRICS_PORT
from lattice.k8s.spec import GROUP, JOB_LABEL, KIND, PLURAL, VERSION

log = logging.getLogger("lattice.operator")
COMPONENT = "lattice-operator"


def _ignore(status: int, exc: ApiException) -> None:
    if exc.status != status:
        raise exc


def _agent_metrics(pod: Mapping[str, Any]) -> str | None:
    url = f"http://{pod['status']['podIP']}:{METRICS_PORT}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.read(1 << 20).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        log.debug("no agent metrics from %s: %s", url, exc)
        return None


class Cluster:
    """API access for one reconcile: jobs, their pods and Service, status, annotations, events."""

    def __init__(self, api_client: client.ApiClient | None = None):
        self.api = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _dict(self, obj: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(obj)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The TrainingJob, or None if it is gone."""
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            _ignore(404, exc)
            return None

    def list_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """The pods labelled with the job's name (the caller checks ownership)."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={job}")
        return [self._dict(p) for p in pods.items]

    def with_agent_status(self, pods: list[dict[str, Any]], url: str | None = None) -> list[dict[str, Any]]:
        """Each running pod with what its agent's metrics say (mid-checkpoint, last checkpoint,
        round), read from ``http://<podIP>:9400/metrics`` in parallel with a short timeout; a pod
        that does not answer is taken as it is (not mid-checkpoint)."""
        targets = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"
                   and (p.get("status") or {}).get("podIP")]
        if not targets or os.environ.get("LATTICE_OPERATOR_READ_AGENTS", "1") == "0":
            return pods
        with concurrent.futures.ThreadPoolExecutor(min(16, len(targets))) as pool:
            texts = dict(zip((id(p) for p in targets), pool.map(_agent_metrics, targets), strict=True))
        return [with_agent_status(p, texts.get(id(p)), url) for p in pods]

    def create(self, obj: Mapping[str, Any]) -> bool:
        """Create a pod or Service; False if one of that name exists already."""
        ns, kind = obj["metadata"]["namespace"], obj["kind"]
        try:
            if kind == "Pod":
                self.core.create_namespaced_pod(ns, dict(obj))
            else:
                self.core.create_namespaced_service(ns, dict(obj))
            return True
        except ApiException as exc:
            _ignore(409, exc)
            return False

    def delete_pod(self, namespace: str, name: str, graceful: bool) -> None:
        """Delete a pod: with its own grace period (SIGTERM first) or at once (grace 0)."""
        body = client.V1DeleteOptions(grace_period_seconds=None if graceful else 0,
                                      propagation_policy="Background")
        try:
            self.core.delete_namespaced_pod(name, namespace, body=body)
        except ApiException as exc:
            _ignore(404, exc)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge-patch the job's status subresource."""
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                          {"status": dict(status)})

    def annotate_job(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Merge-patch annotations onto the job."""
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   {"metadata": {"annotations": dict(annotations)}})

    def post_event(self, job: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about the job (shown by ``kubectl describe tj``)."""
        meta = job["metadata"]
        now = iso(time.time())
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as exc:  # an event is not worth failing a reconcile for
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
