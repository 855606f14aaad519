"""Several agents as separate processes on one machine, sharing a rendezvous server: an agent
SIGKILLed (the others go on with fewer nodes), a new agent joining (scale up, no lost step),
an agent stopped with SIGTERM (scale down, no lost step), and the KV store unreachable for a
while (training goes on)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
from agent_support import (
    LATTICE,
    WORKER,
    Proc,
    last_step_before,
    leave_gracefully,
    serve,
    start_step,
    wait_committed,
)


def agent(tmp: Path, endpoint: str, *worker: str, ttl: str = "1") -> Proc:
    return Proc([*LATTICE, "agent", "--nnodes", "1:3", "--rdzv-endpoint", endpoint, "--rdzv-id", "el",
                 "--ttl", ttl, "--last-call", "1", "--grace", "20", "--checkpoint-dir", str(tmp / "ckpt"),
                 WORKER, "--out", str(tmp), *worker], tmp)


def worker_lines(p: Proc, pattern: str) -> list[re.Match[str]]:
    return [m for line in p.lines if (m := re.search(pattern, line))]


def two_agents(tmp: Path, endpoint: str, procs: list[Proc], sleeps: tuple[str, str], every: str) -> tuple[Proc, Proc]:
    """Agents a and b (workers sleeping ``sleeps`` per step, checkpointing every ``every``), once
    both workers have started in a world of 2."""
    a, b = (agent(tmp, endpoint, "--steps", "100000", "--sleep", s, "--every", every) for s in sleeps)
    procs += [a, b]
    for p in (a, b):
        p.wait_for(lambda ln: "start step 0 world 2" in ln, 60)
    return a, b


@pytest.mark.timeout(240)
def test_agents_survive_a_kill_and_scale_up_and_down_without_losing_planned_steps(tmp_path: Path) -> None:
    server, endpoint = serve(tmp_path)
    procs = [server]
    try:
        a, b = two_agents(tmp_path, endpoint, procs, ("0.05", "0.05"), "10")
        a.wait_for(lambda ln: ln.endswith("]: step 25"), 60)
        wait_committed(tmp_path / "ckpt", 20)

        # an agent dies: the survivor re-rendezvouses alone and resumes from the newest checkpoint
        mark = a.mark()
        b.kill()
        line = a.wait_for(lambda ln: "world 1" in ln and "start step" in ln, 60, after=mark)
        resumed = start_step(line)
        assert resumed >= 20 and resumed % 10 == 0

        # scale up: a new agent joins; the running worker checkpoints at an agreed step first
        a.wait_for(lambda ln: ln.endswith(f"]: step {resumed + 5}"), 60)
        mark = a.mark()
        c = agent(tmp_path, endpoint, "--steps", "100000", "--sleep", "0.05", "--every", "10")
        procs.append(c)
        up = a.wait_for(lambda ln: "world 2" in ln and "start step" in ln, 60, after=mark)
        up_step = start_step(up)
        assert up_step == last_step_before(a, up)  # no completed step is redone
        c.wait_for(lambda ln: f"start step {up_step} world 2" in ln, 60)

        # scale down: SIGTERM to the newcomer; both stop at one step, the survivor goes on alone
        a.wait_for(lambda ln: ln.endswith(f"]: step {up_step + 5}"), 60)
        down, down_step = leave_gracefully(a, c)
        assert down_step == last_step_before(a, down)
        c_steps = [int(m.group(1)) for m in worker_lines(c, r"\]: step (\d+)$")]
        assert max(c_steps) == down_step  # the leaving node's last step is in the checkpoint too
    finally:
        for p in procs:
            p.kill()


@pytest.mark.timeout(120)
def test_training_goes_on_while_the_store_is_unreachable(tmp_path: Path) -> None:
    server, endpoint = serve(tmp_path)
    a = None
    try:
        a = agent(tmp_path, endpoint, "--steps", "120", "--sleep", "0.1", "--every", "10", ttl="10")
        a.wait_for(lambda ln: ln.endswith("]: step 10"), 60)
        server.proc.send_signal(signal.SIGSTOP)  # the store stops answering for 10 s
        time.sleep(10)
        during = [int(m.group(1)) for m in worker_lines(a, r"\]: step (\d+)$")]
        server.proc.send_signal(signal.SIGCONT)
        assert max(during) >= 60  # the worker kept training while the store was away
        assert a.wait(90) == 0, a.text
        assert len(worker_lines(a, r"start step")) == 1  # never restarted
        assert worker_lines(a, r"done 120")
    finally:
        server.proc.send_signal(signal.SIGCONT)
        if a is not None:
            a.kill()
        server.kill()


@pytest.mark.timeout(120)
def test_a_planned_stop_never_sends_a_rank_that_is_ahead_back(tmp_path: Path) -> None:
    """Ranks that do not synchronise every step drift apart: here the leaving agent's worker is
    far behind the survivor's. The stop step is agreed by both agents (the maximum of their
    proposals), so the survivor redoes no step and the leaver's last step is the checkpoint."""
    server, endpoint = serve(tmp_path)
    procs = [server]
    try:
        a, b = two_agents(tmp_path, endpoint, procs, ("0.02", "0.1"), "100000")
        b.wait_for(lambda ln: ln.endswith("]: step 10"), 60)
        down, down_step = leave_gracefully(a, b)
        b_steps = [int(m.group(1)) for m in worker_lines(b, r"\]: step (\d+)$")]
        assert down_step == last_step_before(a, down) == max(b_steps)
        assert down_step > 20  # the survivor was well ahead of the leaver's 10 steps
    finally:
        for p in procs:
            p.kill()


@pytest.mark.timeout(180)
def test_two_agents_leaving_at_once_agree_with_the_survivor_on_one_step(tmp_path: Path) -> None:
    """Three agents whose workers run at different paces; two get SIGTERM at the same moment. All
    three agree on one step (past every worker), both leavers exit 0, and the survivor resumes
    alone from that step without redoing any."""
    server, endpoint = serve(tmp_path)
    procs = [server]
    try:
        a, b = two_agents(tmp_path, endpoint, procs, ("0.03", "0.06"), "100000")
        c = agent(tmp_path, endpoint, "--steps", "100000", "--sleep", "0.09", "--every", "100000")
        procs.append(c)
        started = [p.wait_for(lambda ln: "world 3" in ln and "start step" in ln, 60) for p in (a, b, c)]
        first = start_step(started[2])
        c.wait_for(lambda ln: ln.endswith(f"]: step {first + 5}"), 60)  # all three train in world 3
        down, down_step = leave_gracefully(a, b, c)
        last = [max(int(m.group(1)) for m in worker_lines(p, r"\]: step (\d+)$")) for p in (b, c)]
        assert down_step == last_step_before(a, down) == last[0] == last[1]
    finally:
        for p in procs:
            p.kill()
