"""A tiny simulated cluster for the reconcile tests: pods that the "scheduler" places while there
is capacity, deletions that take their grace period, and a clock. It applies a Plan the way the
kopf layer does (create, delete graceful/at once) and checks the reconcile invariants."""

from __future__ import annotations

import dataclasses

from lattice.k8s import JobSpec, Observed, Plan, reconcile, worker_name
from lattice.k8s.model import FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL, DeleteWorker, Worker

GRACE = 20.0


def spec_of(min_size: int = 1, max_size: int = 3, replicas: int | None = None, max_restarts: int = 3,
            generation: int = 1, **timing: float) -> JobSpec:
    """A JobSpec without parsing (the tests of spec.py cover parsing)."""
    template = {"spec": {"containers": [{"name": "trainingjob", "image": "img", "command": ["python", "t.py"]}]}}
    return JobSpec(name="job", namespace="ns", min_size=min_size, max_size=max_size, template=template,
                   replicas=replicas, max_restarts=max_restarts, generation=generation, uid="u1", **timing)


def check_plan(spec: JobSpec, obs: Observed, plan: Plan) -> None:
    """The invariants every plan must keep, whatever it observed."""
    by_name = {w.name: w for w in obs.workers}
    live_before = [w for w in obs.workers if w.live]
    deleted = [a.name for a in plan.deletes]
    assert len(deleted) == len(set(deleted)), f"a worker deleted twice: {deleted}"
    for d in plan.deletes:
        assert d.name in by_name, f"deleting {d.name}, which does not exist"
        assert not by_name[d.name].mid_checkpoint, f"deleted {d.name} while it checkpoints"
    occupied = {w.index for w in obs.workers}
    created = [c.index for c in plan.creates]
    assert len(created) == len(set(created)) and not occupied & set(created), (created, occupied)
    live_after = len([w for w in live_before if w.name not in deleted]) + len(created)
    if created:
        assert live_after <= spec.max_size, f"{live_after} workers planned, max {spec.max_size}"
    assert live_after <= max(spec.max_size, len(live_before))
    ending = any(w.phase == SUCCEEDED and not w.deleting for w in obs.workers)  # training finished
    if plan.status.phase not in TERMINAL and not ending:
        assert live_after >= min(spec.min_size, len(live_before)), (
            f"{live_after} workers left, min {spec.min_size}, had {len(live_before)}")
        assert live_after <= spec.desired or not created
    assert plan.status.restarts <= max(spec.max_restarts, obs.restarts)
    replaced = [d for d in plan.deletes if d.reason == "WorkerFailed"]
    assert plan.status.restarts == obs.restarts + len(replaced)
    decisions = len(plan.creates) + len([d for d in plan.deletes if d.reason in ("ScaleDown", "WorkerFailed")])
    assert len(plan.events) >= decisions, "every scale and restart decision has an Event"
    assert plan.status.phase in ("Pending", "Running", "Scaling", "Restarting", "Succeeded", "Failed")
    assert plan.status.replicas == spec.desired and plan.status.selector == "exabits.ai/job=job"


@dataclasses.dataclass
class Pod:
    """A simulated pod."""

    index: int
    phase: str = PENDING
    created: float = 0.0
    unschedulable_since: float | None = None
    deleted_at: float | None = None
    checkpointing: bool = False


class Cluster:
    """Pods, a node capacity (None: unlimited) and a clock; ``step`` reconciles and applies."""

    def __init__(self, spec: JobSpec, capacity: int | None = None, now: float = 1000.0):
        self.spec, self.capacity, self.now = spec, capacity, now
        self.pods: dict[int, Pod] = {}
        self.status: dict | None = None
        self.memory = Observed().memory
        self.plans: list[Plan] = []

    def observed(self) -> Observed:
        workers = tuple(
            Worker(name=worker_name("job", p.index), index=p.index, phase=p.phase,
                   ready=p.phase == RUNNING, unschedulable_since=p.unschedulable_since,
                   deleted_at=p.deleted_at, checkpointing=p.checkpointing)
            for p in sorted(self.pods.values(), key=lambda p: p.index))
        return Observed.from_status(self.status, workers, self.memory)

    def step(self) -> Plan:
        """One reconcile: plan, check the invariants, apply the actions."""
        obs = self.observed()
        plan = reconcile(self.spec, obs, self.now)
        assert reconcile(self.spec, obs, self.now) == plan, "reconcile is not deterministic"
        check_plan(self.spec, obs, plan)
        for action in plan.actions:
            if isinstance(action, DeleteWorker):
                pod = self.pods[int(action.name.rsplit("-", 1)[1])]
                pod.deleted_at = self.now + (GRACE if action.graceful else 0.0)
            elif hasattr(action, "index"):
                self.pods[action.index] = Pod(action.index, created=self.now)
        self.status, self.memory = plan.status.to_dict(), plan.memory
        self.plans.append(plan)
        return plan

    def tick(self, seconds: float) -> None:
        """Time passes: deletions finish, pending pods are scheduled while capacity lasts."""
        self.now += seconds
        for i, pod in list(self.pods.items()):
            if pod.deleted_at is not None and pod.deleted_at <= self.now:
                del self.pods[i]
            elif pod.phase in (RUNNING, PENDING) and pod.deleted_at is not None and not pod.checkpointing:
                pod.phase = SUCCEEDED  # SIGTERM: the agent checkpoints and exits 0
        placed = sum(1 for p in self.pods.values() if p.phase == RUNNING)
        for pod in sorted(self.pods.values(), key=lambda p: p.index):
            if pod.phase != PENDING or pod.deleted_at is not None:
                continue
            if self.capacity is None or placed < self.capacity:
                pod.phase, pod.unschedulable_since = RUNNING, None
                placed += 1
            elif pod.unschedulable_since is None:
                pod.unschedulable_since = self.now

    def live(self) -> list[Pod]:
        return [p for p in self.pods.values() if p.phase in (PENDING, RUNNING) and p.deleted_at is None]

    def fail(self, index: int) -> None:
        self.pods[index].phase = FAILED
        self.pods[index].checkpointing = False
