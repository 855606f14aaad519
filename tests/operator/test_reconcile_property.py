"""Hypothesis tests of the pure reconcile core: single calls on arbitrary observations, and a
state machine driving a simulated cluster (failures, unschedulable pods, scaling, min/max edits,
checkpoints in progress, time). The invariants are in ``operator_sim.check_plan``:

- never more than ``maxSize`` live workers planned, never fewer than ``minSize`` (or than it had)
  unless the job ends;
- never a deletion of a worker that is mid-checkpoint;
- the restart budget: restarts grow by one per replaced failed worker, never past ``maxRestarts``;
- an Event for every scale and restart decision; deterministic.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from operator_sim import Cluster, check_plan, spec_of

from lattice.k8s import Memory, Observed, reconcile, worker_name
from lattice.k8s.model import FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL, Worker

NOW = 10_000.0


@st.composite
def specs(draw):
    lo = draw(st.integers(1, 4))
    hi = draw(st.integers(lo, 6))
    return spec_of(min_size=lo, max_size=hi, replicas=draw(st.none() | st.integers(0, 8)),
                   max_restarts=draw(st.integers(0, 4)), generation=draw(st.integers(1, 3)),
                   unschedulable_timeout=draw(st.sampled_from([0.0, 60.0, 120.0])))


@st.composite
def workers(draw):
    indices = draw(st.lists(st.integers(0, 9), unique=True, max_size=8))
    out = []
    for i in indices:
        phase = draw(st.sampled_from([PENDING, RUNNING, RUNNING, SUCCEEDED, FAILED]))
        out.append(Worker(
            name=worker_name("job", i), index=i, phase=phase, ready=draw(st.booleans()),
            unschedulable_since=draw(st.none() | st.floats(NOW - 500, NOW)) if phase == PENDING else None,
            deleted_at=draw(st.none() | st.floats(NOW - 60, NOW + 60)),
            checkpointing=draw(st.booleans())))
    return tuple(out)


memories = st.builds(Memory, capped_at=st.none() | st.integers(1, 6),
                     gave_up_at=st.none() | st.floats(NOW - 900, NOW), backoff=st.sampled_from([0.0, 60.0, 240.0]),
                     generation=st.integers(1, 3))


@settings(max_examples=400, deadline=None)
@given(spec=specs(), ws=workers(), restarts=st.integers(0, 4),
       phase=st.none() | st.sampled_from(["Pending", "Running", "Scaling", "Restarting", "Succeeded", "Failed"]),
       memory=memories)
def test_every_plan_keeps_the_invariants(spec, ws, restarts, phase, memory):
    restarts = min(restarts, spec.max_restarts)
    obs = Observed(workers=ws, phase=phase, restarts=restarts, memory=memory)
    plan = reconcile(spec, obs, NOW)
    check_plan(spec, obs, plan)
    assert plan == reconcile(spec, obs, NOW)


@settings(max_examples=200, deadline=None)
@given(spec=specs(), ws=workers())
def test_a_failure_beyond_the_budget_fails_the_job_and_keeps_failed_pods(spec, ws):
    failed = [w for w in ws if w.phase == FAILED and not w.deleting]
    done = any(w.phase == SUCCEEDED and not w.deleting for w in ws)
    obs = Observed(workers=ws, phase="Running", restarts=spec.max_restarts)
    plan = reconcile(spec, obs, NOW)
    if failed and not done:
        assert plan.status.phase == "Failed"
        assert plan.status.condition("Failed").reason == "RestartBudgetExhausted"
        assert not {d.name for d in plan.deletes} & {w.name for w in failed}
        assert not plan.creates
    assert plan.status.restarts == spec.max_restarts


@settings(max_examples=150, deadline=None)
@given(spec=specs(), start=st.lists(st.integers(0, 9), unique=True, max_size=7),
       running=st.booleans())
def test_converges_to_the_desired_size_under_stable_observations(spec, start, running):
    cluster = Cluster(spec)
    for i in start:
        cluster.pods[i] = __import__("operator_sim").Pod(i, phase=RUNNING if running else PENDING)
    for _ in range(12):
        plan = cluster.step()
        cluster.tick(30.0)
    plan = cluster.step()
    assert len(cluster.live()) == spec.desired
    assert plan.status.phase == "Running", plan.status
    assert plan.status.ready_replicas == spec.desired
    assert plan.status.condition("Ready").status == "True"
    assert not plan.creates and not plan.deletes


class ClusterMachine(RuleBasedStateMachine):
    """Random events on a simulated cluster; every reconcile's plan is checked."""

    @initialize(spec=specs(), capacity=st.none() | st.integers(0, 6))
    def start(self, spec, capacity):
        self.cluster = Cluster(dataclasses.replace(spec, unschedulable_timeout=60.0, retry_backoff=30.0,
                                                   max_retry_backoff=120.0), capacity)
        self.ended = None

    @rule()
    def reconcile(self):
        plan = self.cluster.step()
        if self.ended is not None:
            assert plan.status.phase == self.ended, "an ended job stays ended"
        if plan.status.phase in TERMINAL:
            self.ended = plan.status.phase

    @rule(seconds=st.sampled_from([1.0, 10.0, 45.0, 200.0]))
    def time_passes(self, seconds):
        self.cluster.tick(seconds)

    @precondition(lambda self: self.cluster.live())
    @rule(data=st.data())
    def a_worker_fails(self, data):
        pod = data.draw(st.sampled_from(self.cluster.live()))
        self.cluster.fail(pod.index)

    @precondition(lambda self: self.cluster.live())
    @rule(data=st.data(), flag=st.booleans())
    def a_worker_checkpoints(self, data, flag):
        pod = data.draw(st.sampled_from(self.cluster.live()))
        pod.checkpointing = flag and pod.phase == RUNNING

    @rule(replicas=st.none() | st.integers(0, 8))
    def kubectl_scale(self, replicas):
        spec = self.cluster.spec
        self.cluster.spec = dataclasses.replace(spec, replicas=replicas, generation=spec.generation + 1)

    @rule(lo=st.integers(1, 4), extra=st.integers(0, 3))
    def edit_min_max(self, lo, extra):
        spec = self.cluster.spec
        self.cluster.spec = dataclasses.replace(spec, min_size=lo, max_size=lo + extra,
                                                generation=spec.generation + 1)

    @rule(capacity=st.none() | st.integers(0, 6))
    def capacity_changes(self, capacity):
        self.cluster.capacity = capacity

    @invariant()
    def restarts_within_budget(self):
        if self.cluster.status:
            assert self.cluster.status["restarts"] <= max(spec_restarts(self.cluster), 0)


def spec_restarts(cluster: Cluster) -> int:
    return cluster.spec.max_restarts


TestClusterMachine = ClusterMachine.TestCase
TestClusterMachine.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("capacity", [1, 2])
def test_gives_up_on_unschedulable_pods_then_grows_back_when_capacity_returns(capacity):
    spec = spec_of(min_size=1, max_size=3, unschedulable_timeout=60.0, retry_backoff=100.0,
                   max_retry_backoff=400.0)
    cluster = Cluster(spec, capacity=capacity)
    for _ in range(5):  # t=1000..1120: pods unschedulable from 1030, given up on at 1090
        cluster.step()
        cluster.tick(30.0)
    plan = cluster.step()  # t=1150, before the retry at 1190
    assert len(cluster.live()) == capacity and plan.status.phase == "Running"
    gave_up = [e.message for p in cluster.plans for e in p.events if e.reason == "GaveUpOnUnschedulable"]
    assert len(gave_up) == 1 and "trying again in 100s" in gave_up[0]
    assert plan.status.condition("CapacityLimited").status == "True"
    for _ in range(6):  # the retry at 1190 finds no room either: give up again, backoff doubled
        cluster.tick(30.0)
        plan = cluster.step()
    gave_up = [e.message for p in cluster.plans for e in p.events if e.reason == "GaveUpOnUnschedulable"]
    assert len(gave_up) == 2 and "trying again in 200s" in gave_up[1]
    assert len(cluster.live()) >= capacity
    cluster.capacity = None  # capacity returns
    for _ in range(15):
        cluster.step()
        cluster.tick(30.0)
    plan = cluster.step()
    assert len(cluster.live()) == 3 and plan.status.phase == "Running"
    assert "RetryingScaleUp" in [e.reason for p in cluster.plans for e in p.events]
    assert plan.status.condition("CapacityLimited").status == "False"
    assert plan.memory == Memory()
