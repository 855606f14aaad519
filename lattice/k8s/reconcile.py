"""The operator's one decision: ``reconcile(spec, observed, now) -> Plan``, a pure function.

It reads the validated spec, the observed workers and the previous status, and returns the
actions that move the job towards its desired size plus the status to write. It does no I/O,
so the kopf layer and ``lattice local`` share it and the tests drive it with hypothesis.

Rules, in the order they apply:

1. **Ended jobs stay ended.** A job whose status is Succeeded or Failed keeps it; live workers
   left over are stopped (gracefully).
2. **Success.** A worker that exited 0 without being asked to stop means the training finished
   (the Lattice agent exits 0 only then; its peers follow). No worker is created or replaced
   any more, workers that never started are deleted, and once no worker runs the job is
   Succeeded.
3. **Failures.** Each failed worker costs one restart from ``maxRestarts``; it is deleted at once
   and recreated under the same name once that is free. A failure beyond the budget fails the
   job (condition Failed, reason RestartBudgetExhausted); the failed pods are kept for their
   logs and the other workers are stopped gracefully.
4. **Capacity.** A worker unschedulable for ``unschedulable_timeout`` is given up on, down to
   ``minSize``: the job is capped at the workers it has and tries to grow again after a backoff
   (doubling per failed retry) or as soon as the spec changes.
5. **Size.** The target is ``spec.replicas`` clamped to ``minSize..maxSize`` (``maxSize`` when
   absent), lowered by the capacity cap but never below ``minSize``. Extra workers are removed
   highest index first, gracefully when running (SIGTERM: the agent checkpoints at its next step
   and leaves), and never while mid-checkpoint (they wait a cycle). Missing workers are created
   at the lowest free indices; the name of a worker being deleted is kept for its replacement
   for ``REUSE_WAIT`` seconds after its deletion time.
6. **Status.** Phase: Restarting (replacing failed workers, until back at size), Pending (no
   worker runs yet), Running (at size, all running), Scaling (otherwise). Conditions Ready and
   CapacityLimited (plus Succeeded/Failed at the end) with reasons; an Event for every scale,
   give-up, retry and restart decision.
"""

from __future__ import annotations

import dataclasses

from .model import (
    FAILED,
    PENDING,
    RESTARTING,
    RUNNING,
    SCALING,
    SUCCEEDED,
    TERMINAL,
    Action,
    Condition,
    CreateWorker,
    DeleteWorker,
    EmitEvent,
    Memory,
    Observed,
    Plan,
    Status,
    Worker,
    iso,
)
from .spec import JobSpec

__all__ = ["reconcile", "worker_name", "REUSE_WAIT", "RECHECK"]  # the model's types: lattice.k8s / .model

REUSE_WAIT = 30.0  # seconds past a deletion time during which the name waits for its replacement
RECHECK = 5.0  # reconcile again this soon while something is in flight


def worker_name(job: str, index: int) -> str:
    """The stable name of a job's worker: ``<job>-worker-<index>``."""
    return f"{job}-worker-{index}"


class _Planner:
    """The working state of one reconcile call: actions so far, counters, memory."""

    def __init__(self, spec: JobSpec, obs: Observed, now: float):
        self.spec, self.obs, self.now = spec, obs, now
        self.actions: list[Action] = []
        self.deleted: set[str] = set()
        self.created: list[int] = []
        self.restarts = obs.restarts
        self.memory = obs.memory
        self.replaced = 0
        self.requeue: list[float] = []
        self.waiting_for_names = 0

    def event(self, type_: str, reason: str, message: str) -> None:
        self.actions.append(EmitEvent(type_, reason, message))

    def delete(self, w: Worker, graceful: bool, reason: str) -> bool:
        """Plan a deletion unless the worker is mid-checkpoint (then retry soon)."""
        if w.mid_checkpoint:
            self.requeue.append(RECHECK)
            return False
        self.actions.append(DeleteWorker(w.name, graceful, reason))
        self.deleted.add(w.name)
        return True

    def live(self) -> list[Worker]:
        """Live workers not deleted by this plan, by index."""
        return sorted((w for w in self.obs.workers if w.live and w.name not in self.deleted),
                      key=lambda w: w.index)

    def after(self, seconds: float) -> None:
        self.requeue.append(max(0.5, seconds))


def reconcile(spec: JobSpec, observed: Observed, now: float) -> Plan:
    """Decide what to do about one job. Pure: same inputs, same plan; no I/O.

    Args:
        spec: the validated job (``parse_job``).
        observed: its workers and previous status (``Observed``).
        now: the current time in seconds since the epoch (for timeouts and condition times).
    Returns:
        The actions to apply in order (creations, graceful or immediate deletions, events), the
        status to write, the memory to keep and when to reconcile again at the latest.
    """
    p = _Planner(spec, observed, now)
    if observed.phase in TERMINAL:
        return _ended(p, observed.phase)
    if any(w.phase == SUCCEEDED and not w.deleting for w in observed.workers):
        return _completing(p)
    if not _replace_failed(p):
        return _fail(p)
    target = _capacity(p)
    _scale_down(p, target)
    _scale_up(p, target)
    return _finish(p, target, _phase(p, target))


def _ended(p: _Planner, phase: str) -> Plan:
    for w in p.live():
        p.delete(w, graceful=w.phase == RUNNING, reason=f"Job{phase}")
    prev = {c.type: c for c in p.obs.conditions}
    conditions = tuple(prev.values()) or (_cond(p, phase, "True", f"Job{phase}", ""),)
    return _plan(p, phase, conditions)


def _completing(p: _Planner) -> Plan:
    """A worker finished the training: create nothing more, wait for the others to end."""
    for w in p.live():
        if w.phase == PENDING:
            p.delete(w, graceful=False, reason="JobCompleting")
    if any(w.phase == RUNNING for w in p.live()):
        p.after(RECHECK)
        ready = _cond(p, "Ready", "False", "Completing", "a worker finished; waiting for the others")
        return _plan(p, RUNNING, (ready, _capacity_condition(p)))
    done = [w.name for w in p.obs.workers if w.phase == SUCCEEDED and not w.deleting]
    p.event("Normal", "JobSucceeded", f"training finished: {', '.join(done)} exited 0")
    conditions = (_cond(p, "Ready", "False", "JobSucceeded", "the job has ended"),
                  _cond(p, SUCCEEDED, "True", "WorkersSucceeded", f"{', '.join(done)} exited 0"))
    return _plan(p, SUCCEEDED, conditions)


def _replace_failed(p: _Planner) -> bool:
    """Delete failed workers for replacement within the budget; False if it is spent."""
    failed = sorted((w for w in p.obs.workers if w.phase == FAILED and not w.deleting),
                    key=lambda w: w.index)
    if p.restarts + len(failed) > p.spec.max_restarts:
        return False
    for w in failed:
        p.restarts += 1
        p.replaced += 1
        p.delete(w, graceful=False, reason="WorkerFailed")
        why = f" ({w.message})" if w.message else ""
        p.event("Warning", "RestartingWorker", f"worker {w.name} failed{why}; replacing it "
                f"(restart {p.restarts} of {p.spec.max_restarts})")
    return True


def _fail(p: _Planner) -> Plan:
    failed = [w for w in p.obs.workers if w.phase == FAILED and not w.deleting]
    names = ", ".join(f"{w.name}" + (f" ({w.message})" if w.message else "") for w in failed)
    msg = (f"{names} failed and the restart budget is spent "
           f"({p.restarts} of {p.spec.max_restarts} restarts used); stopping the job")
    p.event("Warning", "JobFailed", msg)
    for w in p.live():
        p.delete(w, graceful=w.phase == RUNNING, reason="JobFailed")
    conditions = (_cond(p, "Ready", "False", "JobFailed", "the job has ended"),
                  _cond(p, FAILED, "True", "RestartBudgetExhausted", msg))
    return _plan(p, FAILED, conditions)


def _capacity(p: _Planner) -> int:
    """The target size after the capacity cap; gives up on long-unschedulable workers."""
    spec, mem, now = p.spec, p.memory, p.now
    target = spec.desired
    if mem.capped_at is not None:
        retry_at = (mem.gave_up_at or 0.0) + mem.backoff
        if mem.generation != spec.generation or now >= retry_at:
            p.memory = dataclasses.replace(mem, capped_at=None, gave_up_at=None)
            if target > mem.capped_at:
                p.event("Normal", "RetryingScaleUp", f"trying again to run {target} workers "
                        f"(limited to {mem.capped_at} since pods could not be scheduled)")
        else:
            target = max(spec.min_size, min(target, mem.capped_at))
            p.after(retry_at - now)
    return _give_up(p, target)


def _give_up(p: _Planner, target: int) -> int:
    spec, now = p.spec, p.now
    live = p.live()
    stuck = [w for w in live if w.phase == PENDING and w.unschedulable_since is not None]
    overdue = [w for w in stuck if now - (w.unschedulable_since or now) >= spec.unschedulable_timeout]
    for w in stuck:
        if w not in overdue:
            p.after((w.unschedulable_since or now) + spec.unschedulable_timeout - now)
    room = min(len(live) - spec.min_size, len(overdue))
    if room <= 0:
        return target
    drop = sorted(overdue, key=lambda w: -w.index)[:room]
    for w in drop:
        p.delete(w, graceful=False, reason="Unschedulable")
    cap = len(live) - len(drop)
    backoff = (spec.retry_backoff if p.memory.backoff <= 0
               else min(spec.max_retry_backoff, p.memory.backoff * 2))
    p.memory = Memory(capped_at=cap, gave_up_at=now, backoff=backoff, generation=spec.generation)
    p.after(backoff)
    p.event("Warning", "GaveUpOnUnschedulable",
            f"{', '.join(w.name for w in drop)} could not be scheduled for "
            f"{spec.unschedulable_timeout:g}s; running with {cap} of {spec.desired} workers, "
            f"trying again in {backoff:g}s")
    return min(target, cap)


def _scale_down(p: _Planner, target: int) -> None:
    live = p.live()
    excess = len(live) - target
    for w in sorted(live, key=lambda w: -w.index)[:max(0, excess)]:
        if p.delete(w, graceful=w.phase == RUNNING, reason="ScaleDown"):
            how = "it checkpoints at its next step and leaves" if w.phase == RUNNING else "it never started"
            p.event("Normal", "ScalingDown", f"stopping worker {w.name} ({len(live)} -> {target} workers); {how}")


def _scale_up(p: _Planner, target: int) -> None:
    live = p.live()
    need = target - len(live)
    if need <= 0:
        return
    occupied = {w.index for w in p.obs.workers}
    kept = [w for w in p.obs.workers if not w.live or w.name in p.deleted]
    reserved = [w for w in kept if w.name in p.deleted and w.phase == FAILED
                or w.deleted_at is not None and w.deleted_at + REUSE_WAIT > p.now]
    p.waiting_for_names = min(need, len(reserved))
    if p.waiting_for_names:
        p.after(RECHECK)
    free = (i for i in range(len(occupied) + need + 1) if i not in occupied)
    restarting = p.replaced > 0 or p.obs.phase == RESTARTING
    reason = "ReplacingWorker" if restarting else "CreatingWorker" if p.obs.phase is None else "ScalingUp"
    for _ in range(need - p.waiting_for_names):
        index = next(free)
        p.created.append(index)
        p.actions.append(CreateWorker(index))
        p.event("Normal", reason, f"creating worker {worker_name(p.spec.name, index)} "
                f"({len(live) + len(p.created)} of {target} workers)")


def _phase(p: _Planner, target: int) -> str:
    live = p.live()
    in_flight = any(w.deleting and w.phase == RUNNING for w in p.obs.workers)
    converged = (len(live) == target and not p.created and not in_flight
                 and all(w.phase == RUNNING for w in live))
    if p.replaced or (p.obs.phase == RESTARTING and not converged):
        return RESTARTING
    if not any(w.phase == RUNNING for w in live):
        return PENDING
    return RUNNING if converged else SCALING


_READY_REASON = {PENDING: "WaitingForWorkers", SCALING: "Scaling", RESTARTING: "Restarting"}


def _finish(p: _Planner, target: int, phase: str) -> Plan:
    ready = sum(1 for w in p.live() if w.ready and w.phase == RUNNING)
    if phase == RUNNING and ready >= target:
        cond = _cond(p, "Ready", "True", "AllWorkersReady", f"{ready} of {target} workers ready")
        if target == p.spec.desired and p.memory.capped_at is None:
            p.memory = Memory()  # at full size: the next give-up starts from the base backoff
    else:
        reason = _READY_REASON.get(phase, "WorkersNotReady")
        cond = _cond(p, "Ready", "False", reason, f"{ready} of {target} workers ready")
        p.after(RECHECK)
    return _plan(p, phase, (cond, _capacity_condition(p)))


def _capacity_condition(p: _Planner) -> Condition:
    mem = p.memory
    if mem.capped_at is not None:
        retry = (mem.gave_up_at or 0.0) + mem.backoff  # a time, not a countdown: the status does not change
        return _cond(p, "CapacityLimited", "True", "Unschedulable",  # on every reconcile (no patch each time)
                     f"running at most {mem.capped_at} of {p.spec.desired} workers: pods could not be "
                     f"scheduled; trying again at {iso(retry)}")
    return _cond(p, "CapacityLimited", "False", "Schedulable", "")


def _cond(p: _Planner, type_: str, status: str, reason: str, message: str) -> Condition:
    """A condition, keeping the previous transition time when its status did not change."""
    prev = next((c for c in p.obs.conditions if c.type == type_), None)
    since = prev.last_transition if prev is not None and prev.status == status else p.now
    return Condition(type_, status, reason, message, since)


def _newest_checkpoint(p: _Planner) -> dict | None:
    found = [dict(w.last_checkpoint) for w in p.obs.workers if w.last_checkpoint]
    if p.obs.last_checkpoint:
        found.append(dict(p.obs.last_checkpoint))
    return max(found, key=lambda c: (int(c.get("step") or 0), str(c.get("time") or "")), default=None)


def _plan(p: _Planner, phase: str, conditions: tuple[Condition, ...]) -> Plan:
    live = p.live()
    rounds = [r for r in [p.obs.round, *(w.round for w in p.obs.workers)] if r is not None]
    status = Status(
        phase=phase, replicas=p.spec.desired,
        ready_replicas=sum(1 for w in live if w.ready and w.phase == RUNNING),
        restarts=p.restarts, conditions=conditions, observed_generation=p.spec.generation,
        selector=p.spec.selector, last_checkpoint=_newest_checkpoint(p),
        round=max(rounds) if rounds else None, live_replicas=len(live) + len(p.created))
    requeue = min(p.requeue) if p.requeue else None
    return Plan(actions=tuple(p.actions), status=status, memory=p.memory, requeue_after=requeue)
