"""``lattice demo``: elastic, fault-tolerant DDP training on local agents, with a timeline.

A small PyTorch model is trained by DDP (gloo, CPU; :mod:`lattice.demo.ddp_train`) under
``lattice agent`` processes on this machine, which meet through the embedded rendezvous
server (started in this process) and share a local checkpoint directory. During the run:

1. two agents start, and train together (world 2);
2. one worker is SIGKILLed: the job re-rendezvouses and resumes from the newest checkpoint
   (the steps since that checkpoint are lost and done again);
3. a third agent starts (scale up): the running workers checkpoint at an agreed step, and
   all three resume from it (no step lost);
4. one agent gets SIGTERM (scale down): the same, without it (no step lost);
5. training finishes.

Rank 0 logs every step (``train.jsonl``); from it the demo prints a timeline of the events
with the steps lost and the recovery time of each, and writes ``loss.svg``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .procs import Agent, Console, TrainingLog
from .report import LEGEND, Event, Row, analyse, table
from .svgplot import write_loss_svg

PHASE_TIMEOUT = 90.0  # seconds any one phase may take before the demo gives up


class Job:
    """The agents of the demo job and what they share (rendezvous, checkpoints, log)."""

    def __init__(self, root: Path, endpoint: str, steps: int, sleep: float, console: Console):
        self.root, self.endpoint, self.steps, self.sleep, self.console = root, endpoint, steps, sleep, console
        self.agents: list[Agent] = []
        self.log = TrainingLog(root / "train.jsonl")

    def command(self) -> list[str]:
        return [sys.executable, "-u", "-m", "lattice.cli", "agent", "--nnodes", "1:3", "--nproc-per-node", "1",
                "--rdzv-endpoint", self.endpoint, "--rdzv-id", "demo", "--ttl", "2", "--last-call", "1",
                "--grace", "20", "--max-restarts", "3", "--checkpoint-dir", str(self.root / "ckpt"),
                "-m", "lattice.demo.ddp_train", "--steps", str(self.steps), "--every", "10",
                "--sleep", str(self.sleep)]

    def add(self) -> Agent:
        name = f"agent-{len(self.agents) + 1}"
        self.console.say(f">>> starting {name}")
        env = {"LATTICE_DEMO_LOG": str(self.log.path), "PYTHONUNBUFFERED": "1"}
        agent = Agent(name, self.command(), self.console, env, self.root / f"{name}.log")
        self.agents.append(agent)
        return agent

    def healthy(self) -> bool:
        """No agent failed (exited with a non-zero code)."""
        return all(a.proc.poll() in (None, 0) for a in self.agents)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        return self.log.wait_for(pred, PHASE_TIMEOUT, what, alive=self.healthy)

    def wait_round_after(self, round_: int, world: int) -> dict[str, Any]:
        """Wait for the first step of a later round with ``world`` ranks; say where it resumed."""
        rec = self.wait_for(lambda r: r["round"] > round_ and r["world"] == world,
                            f"a round after {round_} with world {world}")
        self.console.say(f"<<< training again: round {rec['round']}, world {rec['world']}, "
                         f"resumed from step {rec['step'] - 1}")
        return rec

    def finish(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        return [a.wait(max(deadline - time.monotonic(), 0.1)) for a in self.agents]

    def kill_all(self) -> None:
        for a in self.agents:
            a.kill()


def scenario(job: Job) -> list[Event]:
    """Drive the job through the three events; returns them (with their times)."""
    n = job.steps
    kill_at, up_at, down_at = n // 5 + 3, n * 9 // 20, n * 7 // 10
    a1, a2 = job.add(), job.add()
    rec = job.wait_for(lambda r: r["world"] == 2 and r["step"] >= kill_at, f"step {kill_at} with 2 workers")

    pid = a2.kill_worker()
    events = [Event(f"SIGKILL worker of agent-2 (pid {pid})", False, time.time(), "SIGKILL")]
    job.console.say(f">>> SIGKILL sent to agent-2's worker (pid {pid}) after step {rec['step']}")
    rec = job.wait_round_after(rec["round"], 2)

    rec = job.wait_for(lambda r: r["step"] >= max(up_at, rec["step"] + 10), f"step {up_at}")
    job.add()
    events.append(Event("agent-3 started (scale up)", True, time.time(), "scale up"))
    rec = job.wait_round_after(rec["round"], 3)

    rec = job.wait_for(lambda r: r["step"] >= max(down_at, rec["step"] + 10), f"step {down_at}")
    a1.terminate()
    events.append(Event("SIGTERM to agent-1 (scale down)", True, time.time(), "scale down"))
    job.console.say(f">>> SIGTERM sent to agent-1 after step {rec['step']}")
    job.wait_round_after(rec["round"], 2)
    return events


def _prepare(workdir: str | None) -> Path:
    root = Path(workdir or tempfile.mkdtemp(prefix="lattice-demo-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def _verdict(rows: list[Row], records: list[dict[str, Any]], steps: int, codes: list[int | None]) -> list[str]:
    """What went wrong (empty: the demo succeeded)."""
    problems = [f"agent-{i + 1} exited with {c}" for i, c in enumerate(codes) if c != 0]
    problems += [f"{r.event.name}: lost {r.lost} steps (a planned event should lose none)"
                 for r in rows if r.event.planned and r.lost != 0]
    problems += [f"{r.event.name}: training did not resume" for r in rows if r.resumed_from is None]
    final = max((r["step"] for r in records), default=0)
    if final != steps:
        problems.append(f"training ended at step {final}, not {steps}")
    return problems


def _summary(root: Path, rows: list[Row], records: list[dict[str, Any]], t0: float) -> None:
    print("\n== timeline (t: seconds since the first agent started)")
    print(table(rows, t0))
    print(LEGEND)
    title = "lattice demo: loss per step (rank 0), one line per rendezvous round; dashed: events"
    svg = write_loss_svg(root / "loss.svg", records, rows, title)
    first, last = records[0], records[-1]
    print(f"\n== trained {last['step']} steps in {last['time'] - first['time']:.0f} s; loss {first['loss']:.3f} "
          f"-> {last['loss']:.3f}")
    print(f"   loss plot:    {svg.resolve()}  (open it in a browser)")
    print(f"   checkpoints:  {root / 'ckpt'}  (try: lattice ckpt ls {root / 'ckpt'})")
    print(f"   logs:         {root}/agent-*.log (agents and workers, unfiltered), {root / 'train.jsonl'}")


def main(workdir: str | None = None, steps: int = 300, sleep: float = 0.04) -> int:
    from ..runtime.kv.server import start_server

    if steps < 60:
        print("lattice demo: --steps must be at least 60", file=sys.stderr)
        return 2
    root = _prepare(workdir)
    server = start_server("127.0.0.1", 0, min_session_ttl=1.0)
    t0 = time.time()
    job = Job(root, f"127.0.0.1:{server.port}", steps, sleep, Console(t0))
    print(f"== elastic demo: DDP (gloo, CPU) under local agents; rendezvous 127.0.0.1:{server.port} (in this "
          f"process); checkpoints in {root / 'ckpt'}\n   plan: 2 agents, SIGKILL one worker, add a 3rd agent, "
          f"SIGTERM one, finish at step {steps}")
    try:
        events = scenario(job)
        codes = job.finish(PHASE_TIMEOUT)
    except (TimeoutError, RuntimeError) as exc:
        print(f"lattice demo: FAILED: {exc}\n   agent logs: {root}/agent-*.log", file=sys.stderr)
        return 1
    finally:
        job.kill_all()
        server.stop()
    records = job.log.refresh()
    rows = analyse(records, events)
    _summary(root, rows, records, t0)
    problems = _verdict(rows, records, steps, codes)
    for p in problems:
        print(f"   PROBLEM: {p}")
    print(f"== {'done' if not problems else 'FAILED'} in {time.time() - t0:.0f} s")
    return 1 if problems else 0
