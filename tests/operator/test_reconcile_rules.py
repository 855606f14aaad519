"""Example-based tests of each reconcile rule (docs/operator.md lists them), on the simulated
cluster of ``operator_sim`` or on hand-built observations."""

from __future__ import annotations

import dataclasses

from operator_sim import Cluster, Pod, spec_of

from lattice.k8s import Observed, reconcile, worker_name
from lattice.k8s.model import FAILED, PENDING, RUNNING, SUCCEEDED, Condition, DeleteWorker, Worker


def running(cluster: Cluster, n: int) -> None:
    for i in range(n):
        cluster.pods[i] = Pod(i, phase=RUNNING)


def settle(cluster: Cluster, steps: int = 6) -> None:
    for _ in range(steps):
        cluster.step()
        cluster.tick(30.0)


def test_new_job_starts_at_the_desired_size_with_an_event_per_worker():
    plan = Cluster(spec_of(min_size=1, max_size=3, replicas=2)).step()
    assert [c.index for c in plan.creates] == [0, 1]
    assert [e.reason for e in plan.events] == ["CreatingWorker", "CreatingWorker"]
    assert plan.status.phase == "Pending" and plan.status.replicas == 2
    assert plan.status.condition("Ready").reason == "WaitingForWorkers"


def test_replicas_absent_means_max_size_and_is_clamped():
    assert spec_of(min_size=2, max_size=5).desired == 5
    assert spec_of(min_size=2, max_size=5, replicas=0).desired == 2
    assert spec_of(min_size=2, max_size=5, replicas=9).desired == 5


def test_failed_worker_is_replaced_under_the_same_name_and_counted():
    cluster = Cluster(spec_of(max_size=3, max_restarts=2))
    running(cluster, 3)
    cluster.step()
    cluster.fail(1)
    plan = cluster.step()
    assert plan.deletes == [DeleteWorker("job-worker-1", graceful=False, reason="WorkerFailed")]
    assert not plan.creates, "waits for the name to be free"
    assert plan.status.phase == "Restarting" and plan.status.restarts == 1
    assert plan.events[0].type == "Warning" and "restart 1 of 2" in plan.events[0].message
    cluster.tick(1.0)
    plan = cluster.step()
    assert [c.index for c in plan.creates] == [1] and plan.events[0].reason == "ReplacingWorker"
    assert plan.status.phase == "Restarting"
    settle(cluster)
    assert cluster.step().status.phase == "Running"


def test_failures_beyond_the_budget_fail_the_job_and_stop_the_others():
    cluster = Cluster(spec_of(max_size=3, max_restarts=1))
    running(cluster, 3)
    cluster.step()
    cluster.fail(0)
    cluster.fail(2)
    plan = cluster.step()
    assert plan.status.phase == "Failed"
    assert plan.status.condition("Failed").reason == "RestartBudgetExhausted"
    assert plan.deletes == [DeleteWorker("job-worker-1", graceful=True, reason="JobFailed")]
    assert [e.reason for e in plan.events] == ["JobFailed"]
    cluster.tick(60.0)
    assert cluster.step().status.phase == "Failed"  # stays ended
    assert set(cluster.pods) == {0, 2}, "the failed pods are kept for their logs"


def test_scale_down_removes_the_highest_index_gracefully_but_never_mid_checkpoint():
    cluster = Cluster(spec_of(min_size=1, max_size=4, replicas=4))
    running(cluster, 4)
    cluster.step()
    cluster.pods[3].checkpointing = True
    cluster.spec = dataclasses.replace(cluster.spec, replicas=2, generation=2)
    plan = cluster.step()
    assert plan.deletes == [DeleteWorker("job-worker-2", graceful=True, reason="ScaleDown")]
    assert plan.status.phase == "Scaling" and plan.requeue_after is not None
    assert plan.events[0].reason == "ScalingDown" and "4 -> 2" in plan.events[0].message
    plan = cluster.step()
    assert not plan.deletes, "worker 3 is still checkpointing: wait a cycle"
    cluster.pods[3].checkpointing = False
    plan = cluster.step()
    assert plan.deletes == [DeleteWorker("job-worker-3", graceful=True, reason="ScaleDown")]
    settle(cluster)
    plan = cluster.step()
    assert sorted(cluster.pods) == [0, 1] and plan.status.phase == "Running"
    assert plan.status.observed_generation == 2


def test_scale_up_and_min_edits_take_effect():
    cluster = Cluster(spec_of(min_size=1, max_size=4, replicas=1))
    settle(cluster)
    assert len(cluster.live()) == 1
    cluster.spec = dataclasses.replace(cluster.spec, replicas=3, generation=2)
    plan = cluster.step()
    assert [c.index for c in plan.creates] == [1, 2] and plan.events[0].reason == "ScalingUp"
    settle(cluster)
    cluster.spec = dataclasses.replace(cluster.spec, min_size=4, generation=3)  # replicas 3 < min 4
    plan = cluster.step()
    assert [c.index for c in plan.creates] == [3]
    cluster.spec = dataclasses.replace(cluster.spec, min_size=1, max_size=2, generation=4)
    settle(cluster)
    assert len(cluster.live()) == 2


def test_a_worker_that_exits_0_finishes_the_job_once_the_others_end():
    spec = spec_of(max_size=3)
    ws = (Worker(worker_name("job", 0), 0, SUCCEEDED), Worker(worker_name("job", 1), 1, RUNNING, ready=True),
          Worker(worker_name("job", 2), 2, PENDING, unschedulable_since=0.0))
    plan = reconcile(spec, Observed(workers=ws, phase="Running"), 100.0)
    assert plan.deletes == [DeleteWorker("job-worker-2", graceful=False, reason="JobCompleting")]
    assert not plan.creates and plan.status.phase == "Running"
    assert plan.status.condition("Ready").reason == "Completing"
    ws = (ws[0], dataclasses.replace(ws[1], phase=SUCCEEDED))
    plan = reconcile(spec, Observed(workers=ws, phase="Running"), 110.0)
    assert plan.status.phase == "Succeeded" and [e.reason for e in plan.events] == ["JobSucceeded"]
    assert plan.status.condition("Succeeded").status == "True"
    assert reconcile(spec, Observed(workers=(), phase="Succeeded"), 120.0).status.phase == "Succeeded"


def test_a_worker_stopped_by_a_deletion_does_not_end_the_job():
    spec = spec_of(max_size=2)
    ws = (Worker(worker_name("job", 0), 0, SUCCEEDED, deleted_at=50.0),  # evicted: SIGTERM, exit 0
          Worker(worker_name("job", 1), 1, RUNNING, ready=True))
    plan = reconcile(spec, Observed(workers=ws, phase="Running"), 60.0)
    assert plan.status.phase == "Scaling" and not plan.creates, "waits for the name to be free"
    plan = reconcile(spec, Observed(workers=ws, phase="Running"), 50.0 + 31.0)
    assert [c.index for c in plan.creates] == [2], "a pod stuck terminating no longer blocks its slot"


def test_condition_transition_time_is_kept_while_the_status_does_not_change():
    spec = spec_of(max_size=1)
    ws = (Worker(worker_name("job", 0), 0, RUNNING, ready=True),)
    prev = (Condition("Ready", "True", "AllWorkersReady", "", 5.0),)
    plan = reconcile(spec, Observed(workers=ws, phase="Running", conditions=prev), 100.0)
    assert plan.status.condition("Ready").last_transition == 5.0
    assert plan.status.to_dict()["conditions"][0]["lastTransitionTime"] == "1970-01-01T00:00:05Z"
    ws = (dataclasses.replace(ws[0], ready=False),)
    plan = reconcile(spec, Observed(workers=ws, phase="Running", conditions=prev), 100.0)
    assert plan.status.condition("Ready").last_transition == 100.0


def test_status_reports_newest_checkpoint_and_round_from_the_workers():
    spec = spec_of(max_size=2)
    ws = (Worker(worker_name("job", 0), 0, RUNNING, ready=True, round=3,
                 last_checkpoint={"step": 40, "time": "2024-01-01T00:00:00Z"}),
          Worker(worker_name("job", 1), 1, RUNNING, ready=True, round=4, last_checkpoint={"step": 30}))
    status = reconcile(spec, Observed(workers=ws, last_checkpoint={"step": 20}), 1.0).status.to_dict()
    assert status["lastCheckpoint"]["step"] == 40 and status["round"] == 4
    assert status["readyReplicas"] == 2 and status["phase"] == "Running"


def test_evicted_pod_counts_as_a_failure():
    spec = spec_of(max_size=1, max_restarts=0)
    ws = (Worker(worker_name("job", 0), 0, FAILED, message="Evicted"),)
    plan = reconcile(spec, Observed(workers=ws, phase="Running"), 1.0)
    assert plan.status.phase == "Failed" and "Evicted" in plan.events[0].message
