"""Shared fixtures: reset the process-wide Lattice session after every test, run Python
subprocesses in their own process group (always killed), and in-process sessions that
are closed when the test ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import lattice

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _close_lattice_session() -> Iterator[None]:
    """``lattice.register/step/checkpoint`` use one process-wide session; forget it after each test."""
    yield
    lattice.close()


@pytest.fixture(autouse=True)
def _remove_dead_agents_memory_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An agent killed by a test leaves its memory-tier directory in /dev/shm (by design: only a
    later agent of the same job and storage rescues it); remove those of this test session's
    jobs once no process holds their lock, so test runs do not fill the machine's shared memory."""
    yield
    from lattice.runtime.agent.memdir import _lock, _owner

    base = tmp_path_factory.getbasetemp().resolve()
    for path in Path("/dev/shm").glob("lattice-*"):
        storage = str(_owner(path).get("storage", ""))
        if not storage or not Path(storage).resolve().is_relative_to(base):
            continue
        fd = _lock(path, {})  # None: held by a live agent (or a rescuer), keep it
        if fd is not None:
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


def run_process(args: list[str], *, timeout: float = 60, env: dict[str, str] | None = None,
                cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a new process group; return its exit status and output (stderr separate).

    The whole group is SIGKILLed if it is still alive when this returns or raises.
    """
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()


@pytest.fixture(scope="session")
def run_command() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_command(argv, env=..., timeout=...)``: any program, in its own process group."""
    return run_process


@pytest.fixture(scope="session")
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(code_or_args, env=..., timeout=...)``: this venv's Python in a subprocess.

    A string is run with ``-c``; a list is passed as arguments (``["-m", "lattice.cli", ...]``).
    """

    def run(code: str | list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        argv = ["-c", code] if isinstance(code, str) else list(code)
        return run_process([sys.executable, *argv], **kw)

    return run


@pytest.fixture
def make_session() -> Iterator[Callable[..., lattice.Session]]:
    """``make_session(checkpoint_dir=..., ...)``: ``lattice.new_session`` closed after the test."""
    made: list[lattice.Session] = []

    def make(**options: Any) -> lattice.Session:
        s = lattice.new_session(**options)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
