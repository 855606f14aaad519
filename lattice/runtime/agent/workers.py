"""The local worker processes of one agent: start, watch, stop, and prefix their output by rank.

Each worker runs in its own process group so a stop reaches everything it started, and gets
SIGKILL when the agent dies (PDEATHSIG). With a ``SparePool`` in the spec a worker starts in a
warm spare process that has already imported torch (see ``spare``), else with ``Popen``.
A planned stop asks the workers (through the control channel) to checkpoint at their next
step and exit; a worker that does not answer within the grace period gets SIGTERM, then
SIGKILL.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from ...core.control import ControlFile
from .spare import MARK, SparePool, die_with_parent

log = logging.getLogger("lattice.agent")
STOP_MARGIN = 2  # steps past the furthest worker at which a planned stop takes effect
REFILL_AFTER = 5.0  # seconds after the start at which used spares are replaced even without a step


@dataclasses.dataclass
class WorkerSpec:
    """What to run: ``command`` (e.g. ``[python, script, *args]``) with ``env`` added per worker."""

    command: Sequence[str]
    base_env: Mapping[str, str]
    control_dir: Path
    grace: float = 30.0  # seconds a worker gets to checkpoint and exit after a planned stop
    spares: SparePool | None = None  # warm spare processes to start workers in (None: Popen)


@dataclasses.dataclass
class Worker:
    local_rank: int
    rank: int
    proc: subprocess.Popen[bytes]
    control: ControlFile
    pumps: list[threading.Thread]


class WorkerGroup:
    """The ``nproc`` workers this agent runs for one round."""

    def __init__(self, spec: WorkerSpec, envs: list[dict[str, str]], out: IO[str] | None = None):
        self.spec, self.envs = spec, envs
        self.out = out or sys.stdout
        self.workers: list[Worker] = []
        self._samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._started = 0.0
        self._refilled: set[int] = set()  # local ranks whose next spare has been started

    def start(self) -> None:
        self._started = time.monotonic()
        for env in self.envs:
            local, rank = int(env["LOCAL_RANK"]), int(env["RANK"])
            control = ControlFile.create(self.spec.control_dir / f"worker-{local}.ctl")
            full = {**os.environ, **self.spec.base_env, **env, "LATTICE_CONTROL": str(control.path),
                    "PYTHONUNBUFFERED": "1"}
            proc = None
            if self.spec.spares is not None:
                proc = self.spec.spares.launch(local, self.spec.command, full)
            spare = proc is not None
            if proc is None:
                proc = subprocess.Popen(list(self.spec.command), env=full, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True,
                                        preexec_fn=functools.partial(die_with_parent, os.getpid()))
            log.debug("local rank %d: pid %d (%s)", local, proc.pid, "spare" if spare else "new process")
            pumps = [self._pump(proc.stdout, rank, self.out, spare), self._pump(proc.stderr, rank, sys.stderr, spare)]
            self.workers.append(Worker(local, rank, proc, control, pumps))

    def _pump(self, stream: IO[bytes] | None, rank: int, sink: IO[str], spare: bool = False) -> threading.Thread:
        """Copy ``stream`` to ``sink`` line by line, prefixed by rank; from a spare, only what
        follows its handoff marker."""

        def run() -> None:
            assert stream is not None
            waiting = spare
            for raw in iter(stream.readline, b""):
                if waiting:  # the spare's own output, e.g. warnings of its imports: not the worker's
                    waiting = not raw.endswith(MARK)
                    if raw != MARK:
                        log.debug("spare for rank %d wrote before its handoff: %r", rank, raw[:200])
                    continue
                line = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    sink.write(f"[rank{rank}]: {line}\n")
                    sink.flush()
            stream.close()

        t = threading.Thread(target=run, name=f"lattice-pump-{rank}", daemon=True)
        t.start()
        return t

    def poll(self) -> dict[int, int | None]:
        """Exit code per local rank (``None`` while running); replaces used spares when due.

        Call from the thread that started the group (spares get PDEATHSIG from that thread).
        """
        self._refill()
        return {w.local_rank: w.proc.poll() for w in self.workers}

    def _refill(self) -> None:
        """Start a worker's next spare once it completed a step (or REFILL_AFTER s after the start)."""
        if self.spec.spares is None or len(self._refilled) == len(self.workers):
            return
        late = time.monotonic() - self._started > REFILL_AFTER
        for w in self.workers:
            if w.local_rank not in self._refilled and (late or w.control.step > 0):
                self._refilled.add(w.local_rank)
                self.spec.spares.fill_slot(w.local_rank)

    def steps(self) -> dict[int, int]:
        """The last step each worker reported through its control file."""
        return {w.local_rank: w.control.step for w in self.workers}

    def request_stop(self, at_step: int | None = None) -> int:
        """Ask every worker to checkpoint at step ``at_step`` and exit; returns the step.

        All ranks must checkpoint the same step (rank 0 commits only when every rank's part
        is in), so by default the step is two past the furthest worker: each worker reaches
        it after at most a step or two more, none can have passed it already.
        """
        if at_step is None:
            at_step = max((w.control.step for w in self.workers), default=0) + STOP_MARGIN
        for w in self.workers:
            if w.proc.poll() is None:
                w.control.request_stop(at_step)
        log.info("asked the workers to checkpoint at step %d and exit", at_step)
        return at_step

    def hold(self, at_step: int) -> None:
        """Keep every worker from passing ``at_step`` while the agents agree on the stop step."""
        for w in self.workers:
            if w.proc.poll() is None:
                w.control.request_hold(at_step)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every worker to exit; True if they all did."""
        deadline = time.monotonic() + timeout
        for w in self.workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def sample_rate(self) -> None:
        """Record (time, furthest step) so a planned stop can allow for the workers' pace."""
        now = time.monotonic()
        steps = [w.control.step for w in self.workers]
        if not steps or min(steps) == 0:
            return  # before every worker's first step the counter jumps to the restored step: not pace
        self._samples.append((now, max(steps)))
        while len(self._samples) > 2 and now - self._samples[0][0] > 3.0:
            self._samples.pop(0)

    def stop_step(self, lead_time: float) -> int:
        """A step no worker can pass within ``lead_time`` seconds from now (at least 2 ahead)."""
        furthest = max((w.control.step for w in self.workers), default=0)
        rate = 0.0
        if len(self._samples) >= 2:
            (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
            rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
        return furthest + STOP_MARGIN + math.ceil(rate * lead_time)

    def stop(self, planned: bool, grace: float | None = None, at_step: int | None = None) -> dict[int, int]:
        """Stop the workers: a planned stop asks them to checkpoint first; returns exit codes."""
        grace = self.spec.grace if grace is None else grace
        if planned:
            self.request_stop(at_step)
            if not self.wait(grace):
                log.warning("workers did not checkpoint and exit within %.0fs; stopping them", grace)
        self._signal(signal.SIGTERM)
        if not self.wait(5.0):
            self._signal(signal.SIGKILL)
            self.wait(10.0)
        for w in self.workers:
            for t in w.pumps:
                t.join(2.0)
            w.control.close()
        return {w.local_rank: w.proc.returncode for w in self.workers}

    def _signal(self, sig: int) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    os.killpg(w.proc.pid, sig)
                except ProcessLookupError:
                    pass
