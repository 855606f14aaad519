"""End-to-end against a real Kubernetes cluster; skipped unless ``KUBECONFIG`` is set.

Prerequisites (docs/operator.md, "End-to-end test"): the CRD installed (``kubectl apply -f
deploy/crd/trainingjobs.yaml``), a namespace the kubeconfig may use (``LATTICE_E2E_NAMESPACE``,
default ``lattice``). The test runs the operator in-process (``kopf.operator`` with the handlers
of ``lattice_operator``) so no operator image is needed, applies a TrainingJob whose container
only sleeps (image ``LATTICE_E2E_IMAGE``, default ``busybox:1.36``; the agent is not started, so
the pods fail fast if the image lacks ``lattice``), and checks that the operator creates the
worker pods with owner references and the headless Service, reports status, and that deleting
the job lets the garbage collector delete its pods.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

pytestmark = [
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"),
                       reason="needs a real cluster: set KUBECONFIG (see docs/operator.md, End-to-end test)"),
    pytest.mark.timeout(300),
]
NAMESPACE = os.environ.get("LATTICE_E2E_NAMESPACE", "lattice")
IMAGE = os.environ.get("LATTICE_E2E_IMAGE", "busybox:1.36")
NAME = f"e2e-{int(time.time()) % 100000}"


def _job() -> dict:
    return {"apiVersion": "exabits.ai/v1", "kind": "TrainingJob",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
            "spec": {"minSize": 1, "maxSize": 2, "maxRestarts": 0,
                     "rendezvous": {"backend": "consul", "endpoint": "http://127.0.0.1:8500"},
                     "replicaSpecs": {"template": {"spec": {"containers": [
                         {"name": "trainingjob", "image": IMAGE, "command": ["sleep", "3600"]}]}}}}}


async def _until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(1.0)
    return False


async def test_operator_creates_owned_workers_and_deletion_cascades():
    import kopf
    import lattice_operator  # noqa: F401  (registers the handlers)
    from kubernetes import client, config

    config.load_kube_config()
    custom, core = client.CustomObjectsApi(), client.CoreV1Api()
    stop = threading.Event()
    task = asyncio.create_task(kopf.operator(namespaces=[NAMESPACE], standalone=True, stop_flag=stop))
    try:
        custom.create_namespaced_custom_object("exabits.ai", "v1", NAMESPACE, "trainingjobs", _job())

        def pods():
            return core.list_namespaced_pod(NAMESPACE, label_selector=f"exabits.ai/job={NAME}").items

        assert await _until(lambda: len(pods()) == 2, 60), "the operator created 2 worker pods"
        job = custom.get_namespaced_custom_object("exabits.ai", "v1", NAMESPACE, "trainingjobs", NAME)
        assert all(p.metadata.owner_references[0].uid == job["metadata"]["uid"] for p in pods())
        assert core.read_namespaced_service(NAME, NAMESPACE).spec.cluster_ip == "None"
        assert await _until(lambda: "phase" in (custom.get_namespaced_custom_object(
            "exabits.ai", "v1", NAMESPACE, "trainingjobs", NAME).get("status") or {}), 30)
    finally:
        try:
            custom.delete_namespaced_custom_object("exabits.ai", "v1", NAMESPACE, "trainingjobs", NAME,
                                                   propagation_policy="Foreground")
        finally:
            gone = await _until(lambda: not core.list_namespaced_pod(
                NAMESPACE, label_selector=f"exabits.ai/job={NAME}").items, 120)
            stop.set()
            await asyncio.wait_for(task, 30)
    assert gone, "deleting the job deleted its pods (owner references)"
