"""The local worker processes of one agent: start, watch, stop, and prefix their output by rank.

Each worker runs in its own process group so a stop reaches everything it started.
A planned stop asks the workers (through the control channel) to checkpoint at their next
step and exit; a worker that does not answer within the grace period gets SIGTERM, then
SIGKILL.
"""

from __future__ import annotations

import dataclasses
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

log = logging.getLogger("lattice.agent")
STOP_MARGIN = 2  # steps past the furthest worker at which a planned stop takes effect


@dataclasses.dataclass
class WorkerSpec:
    """What to run: ``command`` (e.g. ``[python, script, *args]``) with ``env`` added per worker."""

    command: Sequence[str]
    base_env: Mapping[str, str]
    control_dir: Path
    grace: float = 30.0  # seconds a worker gets to checkpoint and exit after a planned stop


@dataclasses.dataclass
class Worker:
    local_rank: int
    rank: int
    proc: subprocess.Popen[bytes]
    control: ControlFile
    pumps: list[threading.Thread]


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the agent dies (Linux), so no worker outlives a killed agent."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerGroup:
    """The ``nproc`` workers this agent runs for one round."""

    def __init__(self, spec: WorkerSpec, envs: list[dict[str, str]], out: IO[str] | None = None):
        self.spec, self.envs = spec, envs
        self.out = out or sys.stdout
        self.workers: list[Worker] = []
        self._samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for env in self.envs:
            local, rank = int(env["LOCAL_RANK"]), int(env["RANK"])
            control = ControlFile.create(self.spec.control_dir / f"worker-{local}.ctl")
            full = {**os.environ, **self.spec.base_env, **env, "LATTICE_CONTROL": str(control.path),
                    "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(list(self.spec.command), env=full, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            pumps = [self._pump(proc.stdout, rank, self.out), self._pump(proc.stderr, rank, sys.stderr)]
            self.workers.append(Worker(local, rank, proc, control, pumps))

    def _pump(self, stream: IO[bytes] | None, rank: int, sink: IO[str]) -> threading.Thread:
        def run() -> None:
            assert stream is not None
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    sink.write(f"[rank{rank}]: {line}\n")
                    sink.flush()
            stream.close()

        t = threading.Thread(target=run, name=f"lattice-pump-{rank}", daemon=True)
        t.start()
        return t

    def poll(self) -> dict[int, int | None]:
        """Exit code per local rank (``None`` while running)."""
        return {w.local_rank: w.proc.poll() for w in self.workers}

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
        self._samples.append((now, max((w.control.step for w in self.workers), default=0)))
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
