"""The kopf layer against a Kubernetes API **test double**: kmock's ``KubernetesEmulator``, an
in-memory fake API server over real HTTP (it merges patches as plain dicts, ignores label
selectors and deletes objects without finalizers at once; no scheduler or kubelet runs, so the
tests set pod phases themselves). No real cluster is involved; see test_e2e_cluster.py for that.

The handler-level tests call ``reconcile_job`` as every kopf trigger does; the last test runs the
whole operator (``kopf.operator`` with the handlers of ``lattice_operator``) against the double.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time

import kmock as km
import kopf
import lattice_operator  # noqa: F401  (registers the handlers, as `kopf run -m` does)
import pytest
from kubernetes import client
from lattice_operator import handlers
from lattice_operator.cluster import Cluster

pytestmark = pytest.mark.timeout(60)
JOBS = "exabits.ai/v1/trainingjobs"
JOB = {
    "apiVersion": "exabits.ai/v1", "kind": "TrainingJob",
    "metadata": {"name": "example-job", "namespace": "lattice", "uid": "uid-1", "generation": 1,
                 "resourceVersion": "1"},
    "spec": {"minSize": 1, "maxSize": 3, "maxRestarts": 1, "replicaSpecs": {"template": {"spec": {"containers": [
        {"name": "trainingjob", "image": "exabits/lattice-resnet", "command": ["python", "-u", "main.py"]}]}}}},
}


def declare(fake) -> None:
    fake.resources[JOBS] = km.ResourceInfo(kind="TrainingJob", namespaced=True, subresources={"status"},
                                           verbs={"get", "list", "watch", "patch"})
    for plural, kind in (("pods", "Pod"), ("services", "Service"), ("events", "Event")):
        fake.resources[f"v1/{plural}"] = km.ResourceInfo(kind=kind, namespaced=True,
                                                         verbs={"get", "list", "watch", "create", "delete", "patch"})


@pytest.fixture()
def fake(kmock):
    """kmock, the test double of the API server, with the resources the operator uses."""
    declare(kmock)
    kmock.objects[JOBS, "lattice", "example-job"] = copy.deepcopy(JOB)
    return kmock


@pytest.fixture()
def api(fake):
    cfg = client.Configuration()
    cfg.host = str(fake.url).rstrip("/")
    return Cluster(client.ApiClient(cfg))


def objects(fake, plural: str) -> dict[str, dict]:
    prefix = "exabits.ai/v1" if plural == "trainingjobs" else "v1"
    return {key[2]: fake.objects[key].raw for key in list(fake.objects)
            if str(key[0].plural) == plural and str(key[0].version) == "v1"
            and (key[0].group or "") == ("exabits.ai" if prefix != "v1" else "")
            and not fake.objects[key].deleted}


def job(fake) -> dict:
    return fake.objects[JOBS, "lattice", "example-job"].raw


def events(fake) -> list[tuple[str, str]]:
    return [(e["type"], e["reason"]) for e in objects(fake, "events").values()]


def set_pod(fake, name: str, phase: str, ready: bool = False, **annotations: str) -> None:
    pod = fake.objects["v1/pods", "lattice", name]
    conds = [{"type": "Ready", "status": "True" if ready else "False"}]
    pod.patch({"status": {"phase": phase, "conditions": conds},
               "metadata": {"annotations": annotations} if annotations else {}})


async def reconcile(api) -> object:
    return await asyncio.to_thread(handlers.reconcile_job, "lattice", "example-job", api)


async def test_new_job_gets_worker_pods_a_headless_service_status_and_events(fake, api):
    plan = await reconcile(api)
    pods = objects(fake, "pods")
    assert sorted(pods) == ["example-job-worker-0", "example-job-worker-1", "example-job-worker-2"]
    for p in pods.values():
        assert p["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert p["spec"]["containers"][0]["command"][:2] == ["lattice", "agent"]
    (svc,) = objects(fake, "services").values()
    assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    status = job(fake)["status"]
    assert status["phase"] == "Pending" and status["replicas"] == 3 and status["observedGeneration"] == 1
    assert status["selector"] == "exabits.ai/job=example-job"
    assert sorted(events(fake)) == [("Normal", "CreatingWorker")] * 3
    assert len(plan.creates) == 3
    assert json.loads(job(fake)["metadata"]["annotations"]["exabits.ai/reconcile-memory"])["cappedAt"] is None


async def test_running_pods_make_the_job_running_and_ready(fake, api):
    await reconcile(api)
    for i in range(3):
        set_pod(fake, f"example-job-worker-{i}", "Running", ready=True)
    plan = await reconcile(api)
    assert not plan.actions
    status = job(fake)["status"]
    assert status["phase"] == "Running" and status["readyReplicas"] == 3
    assert status["conditions"][0] == {**status["conditions"][0], "type": "Ready", "status": "True"}


async def test_a_failed_pod_is_replaced_then_the_budget_fails_the_job(fake, api):
    await reconcile(api)
    for i in range(3):
        set_pod(fake, f"example-job-worker-{i}", "Running", ready=True)
    await reconcile(api)
    set_pod(fake, "example-job-worker-1", "Failed")
    await reconcile(api)
    assert "example-job-worker-1" not in objects(fake, "pods")
    assert job(fake)["status"]["phase"] == "Restarting" and job(fake)["status"]["restarts"] == 1
    assert ("Warning", "RestartingWorker") in events(fake)
    await reconcile(api)
    assert "example-job-worker-1" in objects(fake, "pods"), "recreated under the same name"
    assert ("Normal", "ReplacingWorker") in events(fake)
    set_pod(fake, "example-job-worker-0", "Failed")  # beyond maxRestarts 1
    await reconcile(api)
    status = job(fake)["status"]
    assert status["phase"] == "Failed"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Failed"] == "RestartBudgetExhausted"
    assert "example-job-worker-0" in objects(fake, "pods"), "the failed pod is kept for its logs"
    assert ("Warning", "JobFailed") in events(fake)


async def test_kubectl_scale_removes_the_highest_index_but_not_while_it_checkpoints(fake, api):
    await reconcile(api)
    for i in range(3):
        set_pod(fake, f"example-job-worker-{i}", "Running", ready=True)
    set_pod(fake, "example-job-worker-2", "Running", ready=True, **{"exabits.ai/checkpointing": "true"})
    fake.objects[JOBS, "lattice", "example-job"].patch({"spec": {"replicas": 1}, "metadata": {"generation": 2}})
    await reconcile(api)
    assert sorted(objects(fake, "pods")) == ["example-job-worker-0", "example-job-worker-2"]
    assert job(fake)["status"]["phase"] == "Scaling" and job(fake)["status"]["replicas"] == 1
    set_pod(fake, "example-job-worker-2", "Running", ready=True, **{"exabits.ai/checkpointing": "false"})
    await reconcile(api)
    assert sorted(objects(fake, "pods")) == ["example-job-worker-0"]
    assert [r for _, r in events(fake)].count("ScalingDown") == 2
    await reconcile(api)
    assert job(fake)["status"]["phase"] == "Running" and job(fake)["status"]["observedGeneration"] == 2


async def test_edited_limits_reach_the_running_agents_through_the_rendezvous_store(fake, api):
    """minSize/maxSize edited on a running job: pods keep their flags, so the operator writes the
    new limits into the job's round document (a real embedded KV server here), where the agents
    act on them (tests/runtime/test_agent_limits.py shows the agents' side)."""
    from lattice_operator import limits

    from lattice.runtime.kv import create_backend
    from lattice.runtime.kv.server import start_server
    from lattice.runtime.rendezvous.decide import RoundState

    server = start_server("127.0.0.1", 0)
    store = create_backend("embedded", url=server.url)
    limits._published.clear()
    try:
        fake.objects[JOBS, "lattice", "example-job"].patch(
            {"spec": {"rendezvous": {"backend": "embedded", "endpoint": server.url}}})
        await reconcile(api)  # generation 1: the pods carry these limits themselves
        key = "lattice/example-job/state"
        store.cas(key, RoundState(round=4, phase="closed", ranks=(("a", 0), ("b", 1))).to_json(), 0)
        assert limits.publish_if_stale(handlers.parse_job(job(fake), handlers.default_rendezvous()),
                                       objects(fake, "pods").values()) is None  # nothing older runs
        fake.objects[JOBS, "lattice", "example-job"].patch({"spec": {"minSize": 2, "maxSize": 5},
                                                            "metadata": {"generation": 5}})
        await reconcile(api)
        deadline = time.monotonic() + 10
        while RoundState.from_json(store.get(key).value).sizes is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        doc = RoundState.from_json(store.get(key).value)
        assert doc.sizes == (5, 2, 5) and doc.round == 4 and doc.rank_of == {"a": 0, "b": 1}
    finally:
        store.close()
        server.stop()


async def test_an_invalid_spec_fails_the_job_with_a_reason(fake, api):
    bad = copy.deepcopy(JOB)
    del bad["spec"]["replicaSpecs"]["template"]["spec"]["containers"][0]["command"]
    fake.objects[JOBS, "lattice", "example-job"] = bad
    with pytest.raises(kopf.PermanentError, match="command is required"):
        await reconcile(api)
    status = job(fake)["status"]
    assert status["phase"] == "Failed" and status["conditions"][0]["reason"] == "InvalidSpec"
    assert ("Warning", "InvalidSpec") in events(fake) and not objects(fake, "pods")


_LOGIN: dict[str, str] = {}


@kopf.on.login(id="kmock_login")
def _login_to_the_test_double(**_):
    """Points kopf at the test double while a test sets ``_LOGIN`` (no kubeconfig needed)."""
    if "server" in _LOGIN:
        return kopf.ConnectionInfo(server=_LOGIN["server"], insecure=True)
    return None


async def _until(predicate, seconds: float = 15.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_the_whole_operator_reconciles_a_job_and_reacts_to_pod_events(fake, api, monkeypatch):
    """kopf.operator with lattice_operator's handlers, logged in to the test double."""
    monkeypatch.setattr(handlers, "_cluster", api)
    monkeypatch.setitem(_LOGIN, "server", str(fake.url).rstrip("/"))
    fake.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = km.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"})
    fake.resources["v1/namespaces"] = km.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list", "watch"})
    stop = threading.Event()
    task = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop))
    try:
        assert await _until(lambda: len(objects(fake, "pods")) == 3), "the create handler made the workers"
        # a pod event through the API (the watch stream sees it): worker 2 failed
        await asyncio.to_thread(api.core.patch_namespaced_pod_status, "example-job-worker-2", "lattice",
                                {"status": {"phase": "Failed"}})
        assert await _until(lambda: (job(fake).get("status") or {}).get("restarts") == 1), (
            "the pod event triggered a reconcile that replaced the worker")
        assert ("Warning", "RestartingWorker") in events(fake)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
