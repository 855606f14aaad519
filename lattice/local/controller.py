"""The local controller: the operator's reconcile loop, acting on local processes.

One controller process per job (started by ``lattice local apply``, or in the foreground)
holds the job's embedded rendezvous server and, every half second:

1. reads the applied job (``job.json``; ``lattice local scale`` edits it) into a ``JobSpec``;
2. reaps agent processes that ended and SIGKILLs those past their grace period after a
   graceful delete (what a kubelet does after ``terminationGracePeriodSeconds``);
3. observes them as :class:`lattice.k8s.Worker` (see :mod:`.observe`);
4. calls :func:`lattice.k8s.reconcile` - the same decision the operator makes - and applies the
   plan: ``CreateWorker`` starts an agent process, ``DeleteWorker`` sends SIGTERM (graceful: the
   agent checkpoints at the next step and leaves) or kills the process tree, ``EmitEvent``
   appends to ``events.jsonl``;
5. writes the status.

It exits once the job has ended and no agent runs; on SIGTERM/SIGINT (``lattice local delete``,
Ctrl-C) it stops every agent gracefully, SIGKILLs what is left after the grace period (at most
``STOP_BOUND`` seconds), and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, LatticeError
from ..k8s.model import TERMINAL, CreateWorker, DeleteWorker, EmitEvent, Memory, Observed, Plan, iso
from ..k8s.reconcile import reconcile, worker_name
from ..k8s.spec import JobSpec, parse_job
from . import procs, translate
from .observe import PodRecord, Rendezvous, exit_message, newest_checkpoint, worker
from .state import JobDir, read_json, write_json

log = logging.getLogger("lattice.local")
TICK = 0.5  # seconds between reconciles
STOP_BOUND = 60.0  # seconds the controller's own shutdown may take at most
CHECKPOINT_EVERY = 2.0  # seconds between looks at the checkpoint directory


class Controller:
    """The reconcile loop of one local job; ``run()`` returns 0 (Succeeded or stopped) or 1 (Failed)."""

    def __init__(self, job_dir: JobDir):
        self.dir = job_dir
        local = read_json(job_dir.local_file) or {}
        self.workdir = local.get("workdir") or os.getcwd()
        self.ttl, self.last_call = float(local.get("ttl", 5.0)), float(local.get("lastCall", 2.0))
        self.checkpoint_dir = local.get("checkpointDir") or str(job_dir.checkpoints)
        self.pods: dict[str, PodRecord] = {}
        self.procs: dict[str, Any] = {}
        self.spec: JobSpec | None = None
        self.generation: Any = None
        self.status: dict[str, Any] = job_dir.read_status()
        self.memory = Memory.from_dict(read_json(job_dir.memory_file))
        self.stop_seen: dict[int, float] = {}
        self.stopping = threading.Event()
        self.server: Any = None
        self.store: Any = None
        self._checkpoint: tuple[float, dict[str, Any] | None] = (0.0, None)
        self._logged: set[str] = set()
        self._saved_pods: list[dict[str, Any]] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
            signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        self._setup()
        try:
            while not self.stopping.is_set():
                try:
                    if self.tick(time.time()):
                        break
                except (LatticeError, OSError) as exc:  # e.g. a worker that cannot start: retried next tick
                    if self.spec is None:
                        raise  # the job never parsed: nothing to run
                    self._once(f"reconcile failed: {exc}")
                self.stopping.wait(TICK)
        finally:
            self._shutdown()
        return 1 if self.status.get("phase") == "Failed" else 0

    def _once(self, message: str) -> None:
        """Log an error once per distinct message (a failing tick repeats every half second)."""
        if message not in self._logged:
            self._logged.add(message)
            log.error("%s", message)

    def _setup(self) -> None:
        from ..runtime.kv.registry import create_backend
        from ..runtime.kv.server import start_server

        self.dir.pid_file.write_text(f"{os.getpid()} {procs.start_time(os.getpid())}\n")
        for old in self.dir.read_pods():  # agents of an earlier controller of this job: their rendezvous is gone
            rec = PodRecord.from_dict(old)
            if rec.exit_code is None and procs.alive(rec.pid, rec.started):
                procs.kill_tree(rec.pid, rec.started)
                log.info("stopped %s (pid %d) left over by an earlier controller", rec.name, rec.pid)
        self._save_pods()
        self.server = start_server("127.0.0.1", 0, min_session_ttl=1.0)
        self.store = create_backend("embedded", url=self.server.url, min_session_ttl=1.0)
        self.dir.endpoint_file.write_text(f"127.0.0.1:{self.server.port}\n")
        log.info("controller of %s/%s: pid %d, rendezvous 127.0.0.1:%d, checkpoints %s",
                 self.dir.namespace, self.dir.name, os.getpid(), self.server.port, self.checkpoint_dir)

    def _shutdown(self) -> None:
        now = time.time()
        for rec in self.pods.values():
            if rec.exit_code is None and rec.deleted_at is None:
                procs.terminate(rec.pid, rec.started)
                rec.deleted_at = now
        bound = min(max((r.grace for r in self.pods.values()), default=0.0), STOP_BOUND)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.1)
        for name, rec in self.pods.items():
            if self.procs[name].poll() is None:
                log.warning("%s did not stop within %.0fs; killing it", name, bound)
            procs.kill_tree(rec.pid, rec.started)
            self.procs[name].poll()
            rec.exit_code = self.procs[name].returncode
        self._save_pods()
        if self.store is not None:
            self.store.close()
        if self.server is not None:
            self.server.stop()
        self.dir.pid_file.unlink(missing_ok=True)
        self.dir.endpoint_file.unlink(missing_ok=True)
        log.info("controller stopped (phase %s)", self.status.get("phase"))

    # -- one reconcile ----------------------------------------------------------------------
    def tick(self, now: float) -> bool:
        """Observe, reconcile, apply, write the status; True once the job ended and nothing runs."""
        spec = self._read_spec()
        self._reap(now)
        plan = reconcile(spec, self._observe(spec, now), now)
        self._apply(plan, spec, now)
        self._write_status(plan)
        return plan.status.phase in TERMINAL and all(p.poll() is not None for p in self.procs.values())

    def _read_spec(self) -> JobSpec:
        job = self.dir.read_job()
        generation = (job.get("metadata") or {}).get("generation")
        if self.spec is None or generation != self.generation:
            try:
                spec = parse_job(job)
            except ConfigError as exc:
                if self.spec is None:
                    raise
                log.error("the applied job is invalid (%s); keeping the previous spec", exc)
                self.generation = generation
                return self.spec
            self.spec, self.generation = translate.localize(spec, self._settings()), generation
            log.info("spec generation %s: %d..%d workers, desired %d", generation, spec.min_size,
                     spec.max_size, spec.desired)
            self._publish_limits(spec)
        return self.spec

    def _publish_limits(self, spec: JobSpec) -> None:
        """Running agents keep the limits they started with: hand them the edited ones (rendezvous/limits.py)."""
        from ..runtime.kv.api import KVError
        from ..runtime.rendezvous.limits import publish_limits

        if not self.pods or spec.generation <= 0:
            return
        try:
            if publish_limits(self.store, spec.name, spec.generation, spec.min_size, spec.max_size):
                log.info("running agents now act on %d..%d workers", spec.min_size, spec.max_size)
        except (KVError, ValueError) as exc:
            log.warning("could not hand the new limits to the running agents: %s", exc)

    def _settings(self) -> translate.LocalSettings:
        return translate.LocalSettings(endpoint=f"127.0.0.1:{self.server.port}", checkpoint_dir=self.checkpoint_dir,
                                       workdir=self.workdir, ttl=self.ttl, last_call=self.last_call)

    def _reap(self, now: float) -> None:
        for name in list(self.pods):
            rec, code = self.pods[name], self.procs[name].poll()
            if code is not None and rec.exit_code is None:
                rec.exit_code = code
                self._checkpoint = (0.0, self._checkpoint[1])  # it may have committed one last checkpoint
                log.info("%s (pid %d) ended: %s%s", name, rec.pid, exit_message(code),
                         " (after a delete)" if rec.deleted_at else "")
            if rec.deleted_at is not None and code is None and now - rec.deleted_at > rec.grace:
                log.warning("%s did not stop within its grace period (%.0fs); killing it", name, rec.grace)
                procs.kill_tree(rec.pid, rec.started)
            if rec.deleted_at is not None and self.procs[name].poll() is not None:
                self._forget(name)  # a deleted pod that ended is gone

    def _observe(self, spec: JobSpec, now: float) -> Observed:
        rdzv = self._rendezvous(spec.name)
        for r in rdzv.stop_rounds:
            self.stop_seen.setdefault(r, now)
        workers = tuple(worker(rec, rdzv, self.stop_seen, now, rec.grace) for rec in self.pods.values())
        observed = Observed.from_status(self.status, workers, self.memory)
        checkpoint = self._newest_checkpoint(now)
        if checkpoint is not None:
            observed = dataclasses.replace(observed, last_checkpoint=checkpoint)
        return observed

    def _rendezvous(self, job: str) -> Rendezvous:
        from ..runtime.kv.api import KVError

        try:
            return Rendezvous.from_entries(job, self.store.list(f"lattice/{job}/").as_dict())
        except (KVError, ValueError) as exc:
            log.warning("cannot read the rendezvous state: %s", exc)
            return Rendezvous()

    def _newest_checkpoint(self, now: float) -> dict[str, Any] | None:
        if now - self._checkpoint[0] >= CHECKPOINT_EVERY:
            self._checkpoint = (now, newest_checkpoint(self.checkpoint_dir))
        return self._checkpoint[1]

    # -- actions --------------------------------------------------------------------------
    def _apply(self, plan: Plan, spec: JobSpec, now: float) -> None:
        for action in plan.actions:
            if isinstance(action, CreateWorker):
                self._create(spec, action.index, now)
            elif isinstance(action, DeleteWorker):
                self._delete(action, now)
            elif isinstance(action, EmitEvent):
                self._event(action, now)
        self._save_pods()

    def _create(self, spec: JobSpec, index: int, now: float) -> None:
        name = worker_name(spec.name, index)
        if name in self.pods:  # only a name that ended can come back; make sure nothing of it is left
            procs.kill_tree(self.pods[name].pid, self.pods[name].started)
            self._forget(name)
        launch = translate.launch(spec, index, self._settings())
        logfile = self.dir.log_of(name)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("a") as f:
            f.write(f"=== {iso(now)} {name}: {' '.join(launch.argv)}\n")
        proc = procs.spawn(launch.argv, {**os.environ, **launch.env}, logfile, launch.cwd,
                           death_signal=signal.SIGTERM)
        self.procs[name] = proc
        self.pods[name] = PodRecord(index=index, name=name, pid=proc.pid, started=procs.start_time(proc.pid),
                                    created=now, grace=launch.grace)
        log.info("started %s: pid %d", name, proc.pid)

    def _delete(self, action: DeleteWorker, now: float) -> None:
        rec = self.pods.get(action.name)
        if rec is None:
            return
        if action.graceful and self.procs[action.name].poll() is None:
            procs.terminate(rec.pid, rec.started)
            rec.deleted_at = now
            log.info("SIGTERM to %s (pid %d): %s", action.name, rec.pid, action.reason)
            return
        procs.kill_tree(rec.pid, rec.started)
        self.procs[action.name].poll()
        log.info("deleted %s: %s", action.name, action.reason)
        self._forget(action.name)

    def _forget(self, name: str) -> None:
        self.pods.pop(name, None)
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.poll()

    def _event(self, event: EmitEvent, now: float) -> None:
        line = {"time": iso(now), "type": event.type, "reason": event.reason, "message": event.message}
        with self.dir.events_file.open("a") as f:
            f.write(json.dumps(line) + "\n")
        (log.warning if event.type == "Warning" else log.info)("event %s: %s", event.reason, event.message)

    def _save_pods(self) -> None:
        """Write ``pods.json`` when the records changed (``delete`` reads it if the controller died)."""
        pods = [rec.to_dict() for rec in sorted(self.pods.values(), key=lambda r: r.index)]
        if pods != self._saved_pods:
            self.dir.write_pods(pods)
            self._saved_pods = pods

    def _write_status(self, plan: Plan) -> None:
        status = plan.status.to_dict()
        status["liveReplicas"] = plan.status.live_replicas
        status["runningPods"] = sum(1 for r in self.pods.values() if r.exit_code is None)
        if status != self.status:
            self.dir.write_status(status)
            self.status = status
        if plan.memory != self.memory:
            write_json(self.dir.memory_file, plan.memory.to_dict())
            self.memory = plan.memory


def main(argv: list[str] | None = None) -> int:
    """``python -m lattice.local.controller STATE_DIR``: run one job's controller (``apply`` starts it)."""
    p = argparse.ArgumentParser(prog="python -m lattice.local.controller")
    p.add_argument("state_dir", help="the job's state directory (<home>/<namespace>/<name>)")
    args = p.parse_args(argv)
    path = Path(args.state_dir)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Controller(JobDir(path.parent.name, path.name, path.parent.parent)).run()


if __name__ == "__main__":
    sys.exit(main())
