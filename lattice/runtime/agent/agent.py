"""The agent loop: rendezvous -> start workers -> watch -> (restart | re-rendezvous | finish).

Decisions about membership live in the rendezvous; this loop only reacts:

- all local workers exited 0: the job is done here (marked in the store so peers that
  see this agent leave do not mistake it for a failure); exit 0;
- a worker failed: count one restart in the job-wide budget (a compare-and-set counter in
  the store, shared by all agents), stop the local workers, open a new round so every
  agent restarts together from the newest checkpoint; past the budget, mark the job failed
  and exit with the worker's code;
- a peer was lost or the round moved on: stop the local workers, join the next round;
- a new agent is waiting and there is room: planned stop (workers checkpoint at their next
  step), then open the next round with it;
- SIGTERM/SIGINT: planned stop, leave (peers re-rendezvous without this node), exit 0.

A planned stop must end every rank of the job at the same step (rank 0 commits a
checkpoint only when every rank's part is in) and no rank may have passed it. The agent that
starts one creates the round's stop record in the store (``lattice/<job>/stop/<round>``);
every agent of the round watches that key, holds its workers a little past their furthest
step and merges that proposal into the record; the maximum, once every agent has
acknowledged, is the step they all stop at (stopping.py).
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..kv.api import CASConflict, KVStore, KVUnavailable
from ..rendezvous.decide import Limits
from .config import AgentConfig, worker_envs
from .memtier import MemoryTier
from .spare import SparePool
from .stopping import StopAgreement, await_leavers
from .workers import WorkerGroup, WorkerSpec

log = logging.getLogger("lattice.agent")
DONE, FAILED, PEER_LOST, JOIN_PENDING, STOP, STOP_AT = (
    "done", "failed", "peer-lost", "join-pending", "stop", "stop-announced")


class _Log(logging.LoggerAdapter):
    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        e = self.extra
        return f"[job={e['job']} node={e['node']} round={e['round']} rank={e['rank']}] {msg}", kwargs


class Agent:
    """One node's agent. ``run()`` returns the process exit code."""

    def __init__(self, cfg: AgentConfig, store: KVStore | None = None, metrics: Any = None):
        self.cfg, self._store, self.metrics = cfg, store, metrics
        if metrics is None and cfg.metrics_port is not None:
            from .metrics import Metrics

            self.metrics = Metrics(cfg.job, cfg.node, cfg.metrics_port, cfg.metrics_addr)
        self._stop = threading.Event()
        self.restarts = 0
        self.log = _Log(log, {"job": cfg.job, "node": cfg.node, "round": "-", "rank": "-"})
        self._control_dir = Path(tempfile.mkdtemp(prefix=f"lattice-{cfg.job}-"))
        # spares only for single-agent jobs (see spare.py)
        self._spares = (SparePool(cfg.command, self._control_dir / "spares", cfg.preload)
                        if cfg.spares and cfg.max_nodes == 1 and SparePool.usable(cfg.command) else None)
        self.memtier = MemoryTier(cfg, self.metrics)  # checkpoints in /dev/shm, persisted in the background

    # -- setup ----------------------------------------------------------------------
    def _open_store(self) -> KVStore:
        if self._store is not None:
            return self._store
        from ..kv.registry import create_backend

        opts: dict[str, Any] = {"url": self.cfg.endpoint_url()}
        if self.cfg.backend == "embedded":
            opts["min_session_ttl"] = self.cfg.min_session_ttl
        self._store = create_backend(self.cfg.backend, **opts)
        return self._store

    def _key(self, name: str) -> str:
        return f"lattice/{self.cfg.job}/{name}"

    def request_stop(self, *_: Any) -> None:
        """Planned stop (SIGTERM/SIGINT): checkpoint at the next step, leave, exit 0."""
        self._stop.set()

    # -- main loop --------------------------------------------------------------------
    def run(self) -> int:
        from ..rendezvous.handler import RendezvousHandler

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        store = self._open_store()
        limits = Limits(self.cfg.min_nodes, self.cfg.max_nodes, self.cfg.last_call, self.cfg.spec_generation)
        handler = RendezvousHandler(store, self.cfg.job, self.cfg.node, limits, addr=self.cfg.addr,
                                    ttl=self.cfg.ttl)
        try:
            self.memtier.start()
            return self._loop(handler)
        finally:
            self.memtier.close()  # waits (bounded) until the newest checkpoint in memory is stored
            if self._spares is not None:
                self._spares.close()
            handler.leave()
            if self.metrics is not None:
                self.metrics.close()

    def _loop(self, handler: Any) -> int:
        while True:
            if self._stop.is_set():
                self.log.info("stop requested before the round started; leaving")
                return 0
            assignment = handler.join(self.cfg.join_timeout)
            self.log.extra.update(round=assignment.round, rank=assignment.rank)
            self._gauge("world_size", assignment.world)
            self._gauge("round", assignment.round)
            group = self._start(assignment)
            outcome, detail = self._watch(group, handler, assignment)
            code = self._react(outcome, detail, group, handler, assignment)
            if code is not None:
                return code

    def _start(self, a: Any) -> WorkerGroup:
        master = (a.master.addr, a.master.port)
        envs = worker_envs(self.cfg, a.rank, a.world, master, a.round, self.restarts)
        spec = WorkerSpec(self.cfg.command, self.memtier.worker_env(), self._control_dir / f"round-{a.round}",
                          self.cfg.grace, spares=self._spares)
        group = WorkerGroup(spec, envs)
        group.start()
        self.log.info("started %d worker(s): world %d x %d, master %s:%d, pids %s", len(envs), a.world,
                      self.cfg.nproc_per_node, *master, ",".join(str(w.proc.pid) for w in group.workers))
        return group

    def _watch(self, group: WorkerGroup, handler: Any, a: Any) -> tuple[str, Any]:
        events: queue.Queue[Any] = queue.Queue()  # per round: a late event of an old round is dropped
        stop_watch = threading.Event()
        for target, args in ((self._watch_store, (handler, events, stop_watch)),
                             (self._watch_stop_key, (a.round, events, stop_watch))):
            threading.Thread(target=target, args=args, daemon=True).start()
        try:
            while True:
                codes = group.poll()
                failed = {r: c for r, c in codes.items() if c not in (None, 0)}
                if failed:
                    return FAILED, failed
                if all(c == 0 for c in codes.values()):
                    return DONE, codes
                if self._stop.is_set():
                    return STOP, None
                self._report_checkpoints(group)
                group.sample_rate()
                try:
                    return events.get(timeout=0.1)
                except queue.Empty:
                    continue
        finally:
            stop_watch.set()

    def _watch_store(self, handler: Any, events: queue.Queue[Any], stop: threading.Event) -> None:
        """Block on the store (a watch, not polling) and forward events that concern this round."""
        from ..rendezvous.api import JoinPending, PeerLost

        while not stop.is_set():
            try:
                event = handler.next_event(timeout=2.0)
            except Exception as exc:  # the store may be down: workers keep training meanwhile
                self.log.warning("rendezvous watch failed (%s); workers keep running, retrying", exc)
                time.sleep(1.0)
                continue
            if isinstance(event, PeerLost):
                events.put((PEER_LOST, event))
                return
            if isinstance(event, JoinPending):
                events.put((JOIN_PENDING, event))
                return

    def _watch_stop_key(self, round_: int, events: queue.Queue[Any], stop: threading.Event) -> None:
        """Block on this round's stop key; forward the step another agent announced."""
        key, index = self._key(f"stop/{round_}"), 0
        while not stop.is_set():
            try:
                entry = self._open_store().get(key)
                if entry is not None:
                    events.put((STOP_AT, json.loads(entry.value)))
                    return
                index = self._open_store().wait(key, index, 2.0).index
            except Exception as exc:  # store down: keep training, try again
                self.log.debug("stop-key watch: %s", exc)
                time.sleep(1.0)

    def _agree_stop(self, a: Any, group: WorkerGroup, leaving: bool) -> dict[str, Any]:
        """Agree with the round's other agents on the step every rank stops at (stopping.py)."""
        agreement = StopAgreement(self._open_store(), self._key(f"stop/{a.round}"), self.cfg.node, a.nodes,
                                  self.log, members_prefix=self._key("members/"))
        record = agreement.settle(agreement.join(group, leaving), min(self.cfg.grace, 10.0))
        self.log.info("planned stop of round %d at step %d%s", a.round, record["at"],
                      f"; leaving: {record['leaving']}" if record["leaving"] else "")
        return record

    # -- reactions ----------------------------------------------------------------------
    def _react(self, outcome: str, detail: Any, group: WorkerGroup, handler: Any, a: Any) -> int | None:
        self.log.info("round %d ended: %s %s", a.round, outcome, detail or "")
        if outcome == DONE:
            self._mark("done", a.round)
            group.stop(planned=False)
            return 0
        if outcome in (STOP, JOIN_PENDING, STOP_AT):
            leaving = self._stop.is_set()  # SIGTERM, possibly while another agent's stop is under way
            self._gauge("checkpointing", 1)  # the operator keeps such a pod (lattice/k8s/observe.py)
            record = self._agree_stop(a, group, leaving)
            group.stop(planned=record["complete"], at_step=record["at"])
            self._gauge("checkpointing", 0)
            self._count_exits(group, "planned")
            if leaving:
                return 0  # leaving the rendezvous (in run()) lets the others form the next round
            await_leavers(self._open_store(), self._key(f"stop/{a.round}"), self._key("members/"),
                          self.cfg.grace + 4 * self.cfg.ttl, self.log)
            handler.request_new_round()
            return None
        if outcome == PEER_LOST:
            if self._marked("done") == a.round:
                return self._finish_after_peer_done(group)
            group.stop(planned=False)  # a lost rank's part can never arrive: no checkpoint to wait for
            self._count_exits(group, "peer-lost")
            return self._code_if_failed()
        # FAILED
        code = next(iter(detail.values()))
        group.stop(planned=False)  # the failed rank's part can never arrive: no checkpoint to wait for
        self._count_exits(group, "failed")
        if not self._take_restart():
            self.log.error("worker exited with %s and the job's restart budget (%d) is spent; failing the job",
                           code, self.cfg.max_restarts)
            self._mark("failed", code)
            handler.request_new_round()
            return code if code > 0 else 1
        self.log.warning("worker exited with %s: restart %d of %d, from the newest checkpoint",
                         code, self.restarts, self.cfg.max_restarts)
        handler.request_new_round()
        return None

    def _finish_after_peer_done(self, group: WorkerGroup) -> int:
        self.log.info("a peer finished the job; waiting for the local workers to finish")
        if not group.wait(self.cfg.grace):
            group.stop(planned=True)
        codes = group.poll()
        return 0 if all(c == 0 for c in codes.values()) else max(abs(c or 1) for c in codes.values())

    def _code_if_failed(self) -> int | None:
        failed = self._marked("failed")
        if failed is not None:
            self.log.error("the job failed on another node (worker exit code %s)", failed)
            return int(failed) if int(failed) > 0 else 1
        return None

    # -- job-wide state in the store --------------------------------------------------
    def _take_restart(self) -> bool:
        """Count one restart in the job-wide budget (CAS); False if it is spent."""
        key = self._key("restarts")
        store = self._open_store()
        for _ in range(100):
            entry = store.get(key)
            used = int(entry.value) if entry else 0
            if used >= self.cfg.max_restarts:
                return False
            try:
                store.cas(key, str(used + 1).encode(), entry.mod_index if entry else 0)
                self.restarts = used + 1
                self._gauge("restarts", self.restarts)
                return True
            except CASConflict:
                continue
        raise RuntimeError("could not update the job's restart counter (too much contention)")

    def _mark(self, name: str, value: Any) -> None:
        try:
            self._open_store().put(self._key(name), json.dumps(value).encode())
        except KVUnavailable as exc:
            self.log.warning("could not record %s=%s in the store: %s", name, value, exc)

    def _marked(self, name: str) -> Any:
        try:
            entry = self._open_store().get(self._key(name))
        except KVUnavailable:
            return None
        return json.loads(entry.value) if entry else None

    # -- metrics ------------------------------------------------------------------------
    def _gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            self.metrics.set(name, value)

    def _report_checkpoints(self, group: WorkerGroup) -> None:
        if self.metrics is not None and group.workers:
            self.metrics.checkpoint(*group.workers[0].control.checkpoint)

    def _count_exits(self, group: WorkerGroup, cause: str) -> None:
        if self.metrics is not None:
            self.metrics.worker_exits(cause, len(group.workers))


class _Context(logging.Filter):
    """Gives every ``lattice.*`` log line of this process the agent's job, node, round and rank
    (lines from helpers that lack them get the prefix; rendezvous lines get the rank added)."""

    def __init__(self, extra: dict[str, Any]):
        super().__init__()
        self.extra = extra  # the agent's live context (round and rank change)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("lattice"):
            e, msg = self.extra, str(record.msg)
            if not msg.startswith("[job="):
                record.msg = f"[job={e['job']} node={e['node']} round={e['round']} rank={e['rank']}] {msg}"
            elif "rank=" not in msg.split("]", 1)[0]:
                head, rest = msg.split("]", 1)
                record.msg = f"{head} rank={e['rank']}]{rest}"
        return True


def main(cfg: AgentConfig) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(cfg)
    context = _Context(agent.log.extra)
    for handler in logging.getLogger().handlers:
        handler.addFilter(context)
    return agent.run()
