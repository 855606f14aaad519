"""``lattice local`` end to end with real processes: a TrainingJob (min 1, max 3) runs as local
agent processes under the controller; it is scaled 1 -> 3, a worker pod (its agent) is
SIGKILLed and replaced, it is scaled 3 -> 2 (the highest index leaves through the planned-stop
path), and it ends Succeeded with every step checkpointed; ``get`` prints kubectl's columns.
A second test deletes a running job: every process ends within the bound, the checkpoints stay.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from local_support import Local, job_yaml

from lattice.core import inspect
from lattice.local import procs

HEADER = ["NAME", "PHASE", "READY", "DESIRED", "MIN", "MAX", "RESTARTS", "AGE"]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    """A ``lattice local`` with its home under tmp_path; every process it started is killed after."""
    work = tmp_path / "work"
    work.mkdir()
    loc = Local(tmp_path / "home", work)
    try:
        yield loc
    finally:
        loc.sweep()  # a failed test may leave processes behind; a passing one checks it left none


def ready(n: int, round_after: int = -1):
    return lambda s: s.get("readyReplicas") == n and s.get("replicas") == n and (s.get("round") or 0) > round_after


@pytest.mark.timeout(240)
def test_job_scales_survives_a_killed_worker_and_succeeds(local: Local, tmp_path: Path) -> None:
    release = tmp_path / "release"
    (local.cwd / "job.yaml").write_text(job_yaml("tj", release, replicas=1))
    out = local.run("apply", "-f", "job.yaml")
    assert out.stdout.strip() == "trainingjob.exabits.ai/tj created"
    assert "image 'exabits/lattice-resnet' is ignored locally" in out.stderr
    s = local.wait("tj", ready(1), "1 worker ready")
    assert s["phase"] == "Running"
    first_round = s["round"]

    # scale up 1 -> 3: two more agents join; the running one checkpoints at an agreed step first
    local.run("scale", "tj", "--replicas", "3")
    s = local.wait("tj", lambda st: ready(3, first_round)(st) and st["phase"] == "Running", "3 workers ready")

    # a worker pod dies (SIGKILL to its agent): the controller replaces it within the restart budget
    victim = next(p for p in local.pods("tj") if p["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    s = local.wait("tj", lambda st: st.get("restarts") == 1 and ready(3, s["round"])(st),
                   "the killed worker replaced and 3 workers ready again", timeout=90)
    replaced = next(p for p in local.pods("tj") if p["index"] == 1)
    assert replaced["pid"] != victim["pid"]

    # scale down 3 -> 2: worker 2 gets SIGTERM, checkpoints with the others at one step, exits 0
    leaving = next(p for p in local.pods("tj") if p["index"] == 2)
    local.run("scale", "tj", "--replicas", "2")
    s = local.wait("tj", lambda st: ready(2, s["round"])(st) and st["phase"] == "Running"
                   and all(p["index"] != 2 for p in local.pods("tj")), "2 workers after the scale-down")
    logs = local.job_dir("tj") / "logs"
    stop = re.search(r"planned stop of round \d+ at step (\d+); leaving", (logs / "tj-worker-2.log").read_text())
    assert stop, "worker 2 did not leave through the planned stop"
    # no step lost: the survivors resume at the step the leaver stopped at (and the env got through)
    local.wait_log("tj", 0, f"rank 0 of 2 start at step {stop.group(1)} greeting=hello")
    controller_log = (local.job_dir("tj") / "controller.log").read_text()
    assert f"tj-worker-2 (pid {leaving['pid']}) ended: exit code 0 (after a delete)" in controller_log

    # finish: every rank trains to one final step, checkpoints, exits 0 -> Succeeded
    final = local.max_step("tj") + 30
    release.write_text(f"{final}\n")
    s = local.wait("tj", lambda st: st.get("phase") == "Succeeded", "Succeeded", timeout=90)
    assert s["restarts"] == 1 and s["lastCheckpoint"]["step"] == final
    assert max(step for step, _ in inspect.listing(local.job_dir("tj") / "checkpoints").committed) == final

    table = local.run("get").stdout.splitlines()
    assert table[0].split() == HEADER
    row = table[1].split()
    assert row[:7] == ["tj", "Succeeded", "0", "2", "1", "3", "1"] and row[7].endswith(("s", "m"))
    _assert_controller_exits(local, "tj")
    events = (local.job_dir("tj") / "events.jsonl").read_text()
    for reason in ("CreatingWorker", "ScalingUp", "RestartingWorker", "ScalingDown", "JobSucceeded"):
        assert reason in events


def _assert_controller_exits(local: Local, name: str) -> None:
    pid_file = local.job_dir(name) / "controller.pid"
    deadline = time.monotonic() + 20
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_file.exists(), "the controller did not exit after the job ended"
    assert not any(procs.alive(p["pid"], p["started"]) for p in local.pods(name))


@pytest.mark.timeout(120)
def test_delete_stops_every_process_and_keeps_the_checkpoints(local: Local, tmp_path: Path) -> None:
    (local.cwd / "job.yaml").write_text(job_yaml("gone", tmp_path / "never", replicas=2, every=5))
    local.run("apply", "-f", "job.yaml")
    local.wait("gone", ready(2), "2 workers ready")
    local.wait("gone", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) >= 5, "a checkpoint")
    pods = local.pods("gone")
    trees = [pid for p in pods for pid in [p["pid"], *procs.descendants(p["pid"])]]
    controller = int((local.job_dir("gone") / "controller.pid").read_text().split()[0])

    t0 = time.monotonic()
    out = local.run("delete", "gone", "--timeout", "30")
    assert out.stdout.strip().startswith('trainingjob.exabits.ai "gone" deleted')
    assert time.monotonic() - t0 < 35
    assert not any(procs.alive(pid) for pid in [controller, *trees])
    assert not (local.job_dir("gone") / "job.json").exists()
    assert inspect.listing(local.job_dir("gone") / "checkpoints").committed  # storage outlives the job
    missing = local.run("get", "gone", check=False)
    assert missing.returncode != 0 and 'trainingjob "gone" not found' in missing.stderr


@pytest.mark.timeout(180)
def test_raising_max_size_lets_a_new_worker_join_the_running_ones(local: Local, tmp_path: Path) -> None:
    """maxSize 2 -> 3 (and replicas 2 -> 3) by re-applying the file: the running agents keep their
    flags (a pod's cannot change) yet let the new one in, since it brings the newer limits."""
    (local.cwd / "job.yaml").write_text(job_yaml("grow", tmp_path / "never", replicas=2, max_size=2))
    local.run("apply", "-f", "job.yaml")
    s = local.wait("grow", ready(2), "2 workers ready")
    before = {p["index"]: p["pid"] for p in local.pods("grow")}
    (local.cwd / "job.yaml").write_text(job_yaml("grow", tmp_path / "never", replicas=3, max_size=3))
    local.run("apply", "-f", "job.yaml")
    local.wait("grow", ready(3, s["round"]), "3 workers ready after raising maxSize", timeout=90)
    after = {p["index"]: p["pid"] for p in local.pods("grow")}
    assert after[0] == before[0] and after[1] == before[1]  # the running workers were not replaced
    local.wait_log("grow", 0, " of 3 start at step")  # worker 0 is in the 3-rank world
    local.run("delete", "grow")
