"""Local processes standing in for pods: start one in its own process group with its output in
a log file, tell whether a recorded pid is still that process, and stop a whole process tree
(the agent's group and its workers' groups) within a bound.

A pid alone can be reused after its process ended; a record also keeps the process's start
time (``/proc/<pid>/stat``), and a pid whose start time differs is another process and is
never signalled.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after ``pid (comm)`` (state first), or None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat[stat.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (None: no such process)."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def _state_and_ppid(pid: int) -> tuple[str, int] | None:
    fields = _stat(pid)
    return None if fields is None else (fields[0], int(fields[1]))


def alive(pid: int, started: int | None = None) -> bool:
    """``pid`` runs (not a zombie) and, when ``started`` is given, is the process started then."""
    fields = _stat(pid)  # one read for the state and the start time
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _state_and_ppid(int(entry.name))) is not None:
            parent_of[int(entry.name)] = info[1]
    found, frontier = [], {pid}
    while frontier:
        kids = {p for p, pp in parent_of.items() if pp in frontier and p not in found}
        found.extend(sorted(kids))
        frontier = kids
    return found


def _signal_on_parent_death(parent: int, sig: int) -> None:
    """In the child (Linux): get ``sig`` when the parent dies; exit if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)


def spawn(argv: Sequence[str], env: Mapping[str, str], log: Path, cwd: str | Path | None = None,
          death_signal: int | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (its own process group), stdout and stderr appended to
    ``log``; with ``death_signal``, the child gets that signal if this process dies."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pre = functools.partial(_signal_on_parent_death, os.getpid(), death_signal) if death_signal else None
    with open(log, "ab") as out:
        return subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pre)


def _signal_tree(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # the pod's (or a worker's) own group, when it leads one
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(pid: int, started: int | None = None, timeout: float = 5.0) -> bool:
    """SIGKILL ``pid``, its process group and every descendant's group; True once all are gone
    (waits at most ``timeout`` s). A pid that is no longer the recorded process is left alone."""
    if not alive(pid, started):
        return True
    tree = [pid, *descendants(pid)]
    _signal_tree(tree, signal.SIGKILL)
    return wait_gone(tree, timeout)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait (bounded) until none of ``pids`` runs; reap those that are our children."""
    pids, deadline = list(pids), time.monotonic() + timeout
    while True:
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        if not any(alive(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def terminate(pid: int, started: int | None = None) -> bool:
    """SIGTERM ``pid`` only (the agent's planned stop); False if it is not the recorded process."""
    if not alive(pid, started):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return True
