"""Warm spare worker processes (``lattice.runtime.agent.spare``) with real processes: a worker
started in a spare gets its argv, environment, working directory, ``sys.path[0]`` and rank
prefix as a fresh interpreter would (script and ``-m`` module); output a spare wrote before
its handoff is dropped; a dead spare falls back to a fresh process; nothing of an agent's
process tree survives a SIGKILL of the agent.

The spares here preload a small module of the test's own (``noisy_preload``, which prints at
import) instead of torch: fast, and a worker can tell whether it started in a spare. The first
round's workers start fresh; a spare is started per slot once its worker has completed a step,
so the workers fail once (or are killed) to be restarted in the spares."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_support import LATTICE, Proc

from lattice.runtime.agent.spare import SparePool, python_target

WORKER = r'''
import json, os, sys, time
info = {"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
        "rank": os.environ.get("RANK"), "control": os.environ.get("LATTICE_CONTROL"),
        "var": os.environ.get("SPARE_TEST_VAR"), "preloaded": "noisy_preload" in sys.modules,
        "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
        "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")}
out, mode = os.environ["SPARE_TEST_OUT"], os.environ.get("SPARE_TEST_MODE", "loop")
with open(os.path.join(out, f"info-{info['rank']}-{info['restart']}-{os.getpid()}.json"), "w") as f:
    json.dump(info, f)
print(f"hello {info['rank']}", flush=True)
print(f"to stderr {info['rank']}", file=sys.stderr, flush=True)
import lattice
state = lattice.register(progress=0)
state.progress += 1
lattice.step()  # the agent starts the slot's next spare once its worker has completed a step
if info["restart"] == "0" and mode != "loop":
    # first run: fail once every rank has stepped, so every slot has a spare for the restart
    open(os.path.join(out, f"stepped-{info['rank']}"), "w").close()
    deadline = time.monotonic() + 30
    world = int(os.environ["WORLD_SIZE"])
    while time.monotonic() < deadline and len([f for f in os.listdir(out) if f.startswith("stepped-")]) < world:
        time.sleep(0.02)
    time.sleep(0.3)  # the agent polls every 0.1 s
    sys.exit(3)
if mode == "raise":
    def f():
        raise ValueError("boom")
    f()
while mode == "loop":
    state.progress += 1
    lattice.step()
    time.sleep(0.05)
'''


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Directories (scripts/, run/ as the working directory, out/) and the agent's environment."""
    for d in ("scripts", "run", "out", "preload"):
        (tmp_path / d).mkdir()
    (tmp_path / "scripts" / "w.py").write_text(WORKER)
    (tmp_path / "run" / "wmod.py").write_text(WORKER)
    (tmp_path / "preload" / "noisy_preload.py").write_text('print("NOISY IMPORT")\n')
    env = {"SPARE_TEST_OUT": str(tmp_path / "out"), "SPARE_TEST_VAR": "from-the-agent",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "preload"), os.environ.get("PYTHONPATH", "")])}
    return tmp_path, env


def agent_cmd(tmp: Path, *flags: str) -> list[str]:
    return [*LATTICE, "run", "--checkpoint-dir", str(tmp / "ckpt"), "--spare-preload", "noisy_preload", *flags]


def infos(tmp: Path) -> list[dict]:
    """What each worker start reported, by (restart count, rank)."""
    got = [json.loads(f.read_text()) for f in (tmp / "out").glob("info-*.json")]
    return sorted(got, key=lambda i: (int(i["restart"]), i["rank"]))


def children(pid: int) -> dict[int, str]:
    """Live (not zombie) direct children of ``pid``: {pid: command line}."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out[int(entry)] = cmd
    return out


def tree(pid: int) -> set[int]:
    """``pid``'s live descendants."""
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def spares_of(agent: int, workers: set[int]) -> set[int]:
    return {p for p, cmd in children(agent).items() if "__lattice_spare__" in cmd and p not in workers}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("spares", [True, False])
def test_restarted_worker_in_a_spare_gets_argv_env_cwd_and_output_prefix(
        job: tuple[Path, dict[str, str]], spares: bool) -> None:
    tmp, env = job
    flags = ["--nproc-per-node", "2", "--max-restarts", "1"] + ([] if spares else ["--no-spares"])
    p = Proc([*agent_cmd(tmp, *flags), "../scripts/w.py", "a", "--b"], tmp / "run", {**env, "SPARE_TEST_MODE": "once"})
    try:
        assert p.wait(80) == 0, p.text
    finally:
        p.kill()
    got = infos(tmp)
    assert [(i["restart"], i["rank"]) for i in got] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], p.text
    for i in got:
        # the first round starts fresh processes; the restart runs in the spares (which imported noisy_preload)
        assert i["preloaded"] is (spares and i["restart"] == "1")
        assert i["argv"] == ["../scripts/w.py", "a", "--b"]
        assert i["cwd"] == str(tmp / "run") and i["path0"] == str((tmp / "scripts").resolve())
        assert i["name"] == "__main__" and i["var"] == "from-the-agent"
        assert i["control"] and Path(i["control"]).name == f"worker-{i['rank']}.ctl"
        assert Path(i["control"]).parent.name == f"round-{i['restart']}"
        assert i["pgid"] == i["pid"] == i["sid"]  # its own session: the agent signals the group
    for r in (0, 1):
        assert p.lines.count(f"[rank{r}]: hello {r}") == 2 and p.lines.count(f"[rank{r}]: to stderr {r}") == 2, p.text
    assert "NOISY IMPORT" not in p.text  # a spare's own output before its handoff is dropped


@pytest.mark.timeout(90)
def test_module_worker_in_a_spare(job: tuple[Path, dict[str, str]]) -> None:
    tmp, env = job
    p = Proc([*agent_cmd(tmp, "--max-restarts", "1"), "-m", "wmod", "x", "y"], tmp / "run",
             {**env, "SPARE_TEST_MODE": "once"})
    try:
        assert p.wait(80) == 0, p.text
    finally:
        p.kill()
    first, second = infos(tmp)
    assert not first["preloaded"] and second["preloaded"], p.text
    for i in (first, second):
        assert i["name"] == "__main__" and i["argv"] == [str(tmp / "run" / "wmod.py"), "x", "y"]
        assert i["path0"] == str(tmp / "run") == i["cwd"]
    assert p.lines.count("[rank0]: hello 0") == 2, p.text


@pytest.mark.timeout(90)
def test_failing_worker_in_a_spare_reports_like_a_fresh_interpreter(job: tuple[Path, dict[str, str]]) -> None:
    tmp, env = job
    p = Proc([*agent_cmd(tmp, "--max-restarts", "1"), "../scripts/w.py"], tmp / "run",
             {**env, "SPARE_TEST_MODE": "raise"})
    try:
        assert p.wait(80) == 1, p.text  # the restart budget is spent: the worker's exit code
    finally:
        p.kill()
    assert infos(tmp)[-1]["preloaded"], p.text
    trace = [ln for ln in p.lines if ln.startswith("[rank0]: ") and "hello" not in ln and "stderr" not in ln]
    assert trace[0] == "[rank0]: Traceback (most recent call last):", p.text
    assert trace[-1] == "[rank0]: ValueError: boom"
    assert not any("spare.py" in ln or "runpy" in ln for ln in trace), p.text  # no frames of the spare


@pytest.mark.timeout(120)
def test_a_dead_spare_falls_back_to_a_fresh_process(job: tuple[Path, dict[str, str]]) -> None:
    tmp, env = job
    p = Proc([*agent_cmd(tmp, "--max-restarts", "3"), "../scripts/w.py"], tmp / "run", env)
    try:
        p.wait_for(lambda ln: ln == "[rank0]: hello 0", 60)
        [first] = infos(tmp)
        # the slot's spare is started once the worker has completed a step
        [spare] = wait_until(lambda: spares_of(p.proc.pid, {first["pid"]}), 30, "the slot's spare")
        os.kill(spare, signal.SIGKILL)
        wait_until(lambda: not alive(spare), 10, "the spare to die")
        mark = p.mark()
        os.kill(first["pid"], signal.SIGKILL)
        p.wait_for(lambda ln: ln == "[rank0]: hello 0", 60, after=mark)
        second = infos(tmp)[-1]
        assert second["restart"] == "1" and not second["preloaded"]  # a fresh process
        assert second["argv"] == ["../scripts/w.py"] and second["cwd"] == str(tmp / "run")
        assert any(f"spare {spare} for local rank 0 exited" in ln for ln in p.lines), p.text
        # the slot gets a new spare, and the next restart runs in it
        wait_until(lambda: spares_of(p.proc.pid, {second["pid"]}), 30, "a new spare")
        mark = p.mark()
        os.kill(second["pid"], signal.SIGKILL)
        p.wait_for(lambda ln: ln == "[rank0]: hello 0", 60, after=mark)
        third = infos(tmp)[-1]
        assert third["restart"] == "2" and third["preloaded"], p.text
    finally:
        p.kill()


@pytest.mark.timeout(120)
def test_nothing_of_the_agents_tree_survives_a_sigkill_of_the_agent(job: tuple[Path, dict[str, str]]) -> None:
    tmp, env = job
    p = Proc([*agent_cmd(tmp, "--nproc-per-node", "2"), "../scripts/w.py"], tmp / "run", env)
    try:
        p.wait_for(lambda ln: ln == "[rank1]: hello 1", 60)
        p.wait_for(lambda ln: ln == "[rank0]: hello 0", 60)
        workers = {i["pid"] for i in infos(tmp)}
        wait_until(lambda: len(spares_of(p.proc.pid, workers)) == 2, 30, "a spare per slot")
        procs = tree(p.proc.pid)
        assert workers < procs and len(procs) == 4, procs
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait(10)
        wait_until(lambda: not any(alive(q) for q in procs), 15, f"{procs} to die with the agent")
    finally:
        p.kill()


@pytest.mark.timeout(60)
def test_pool_falls_back_when_its_spare_is_dead_and_stops_its_spares(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint('ran', sys.argv[1:])\n")
    cmd = [sys.executable, "-u", str(script), "arg"]
    pool = SparePool(cmd, tmp_path / "pool", preload=[])
    try:
        pool.fill(2)
        first, second = pool.pids()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not alive(first), 10, "the spare to die")
        assert pool.launch(0, cmd, dict(os.environ)) is None  # dead: the caller starts the worker
        proc = pool.launch(1, cmd, dict(os.environ), str(tmp_path))
        assert proc is not None and proc.pid == second
        out, _ = proc.communicate(timeout=20)
        assert out.endswith(b"ran ['arg']\n") and proc.returncode == 0
        pool.fill(2)
        spares = pool.pids()
        assert len(spares) == 2 and first not in spares and second not in spares
    finally:
        pool.close()
    assert not any(alive(q) for q in spares) and pool.pids() == []
    assert not list((tmp_path / "pool").glob("*"))  # assignment files are consumed


def test_which_commands_a_spare_can_run() -> None:
    py = sys.executable
    assert python_target([py, "-u", "t.py", "-x"]) == (False, "t.py", ["-x"])
    assert python_target([py, "-u", "-m", "pkg.mod", "a"]) == (True, "pkg.mod", ["a"])
    assert python_target([py, "t.py"]) == (False, "t.py", [])
    assert python_target(["./t.py", "a"]) is None  # --no-python
    assert python_target([py, "-O", "t.py"]) is None  # an interpreter flag a spare cannot reproduce
    assert python_target([py, "-c", "pass"]) is None
