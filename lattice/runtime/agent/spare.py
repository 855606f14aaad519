"""Warm spare worker processes: a restarted worker starts in an interpreter that has already
imported torch.

A fresh Python interpreter spends about 1.5 s importing torch before the training script's
first line runs; after a worker failure that is most of the recovery time. So the agent keeps,
per local worker slot, one *spare*: an interpreter started like a worker (the worker's Python,
the agent's environment and working directory, its own session and process group, PDEATHSIG)
that imports the preload modules (default ``torch``, ``torch._dynamo`` and ``lattice``; a
module that fails to import is skipped) and then blocks reading a pipe. ``torch._dynamo`` is
there because torch imports it lazily, e.g. when the first optimizer is created: another
second, and about 800 modules, that a fresh worker pays after ``import torch``. The imports
run in a helper thread at nice 19 (Linux nice values are per thread; the thread ends with its
imports, the worker runs in the main thread at the normal priority), so a spare never takes
CPU from training on the node; ``numpy`` is imported first in the main thread, because its BLAS
starts a thread pool at import and threads inherit their creator's nice value. If the
assignment arrives first, the remaining preloads are skipped (the worker imports them itself).
Importing torch does not initialise CUDA (that happens at first use), so the worker still
chooses its device after the handoff.

Starting a worker hands the slot's spare its assignment (argv, complete environment, working
directory; written to a file in the agent's private directory, its path sent on the pipe, so
a large environment never blocks the agent). The spare applies it the way the interpreter
would have started the script: ``os.environ`` replaced (``putenv`` too, so C code sees it),
``chdir``, ``sys.argv``, ``sys.path[0]`` (the script's real directory, or the working
directory for ``-m``), then runs the script with ``runpy.run_path(..., run_name="__main__")``
or the module with ``runpy.run_module(..., alter_sys=True)``. From then on the process *is*
the worker: same pid and process group, watched, signalled and reaped by the agent like a
worker started with ``Popen``; its exit code is the script's (an uncaught exception prints the
traceback and exits 1, ``sys.exit`` and ``atexit`` behave as usual). The agent starts a new
spare for the slot, for next time, once the slot's worker has completed a step (or 5 s after
the start, for scripts that do not call ``lattice.step``): not at once, so that on a machine
with few cores the replacement's imports do not slow the restarted worker's restore and first
step. The first round's workers start fresh, all alike; spares serve the restarts.

Output: the spare's stdout and stderr are pipes to the agent, read only from the handoff on.
After reading its assignment the spare writes a marker line to both; the agent discards what
came before it (e.g. warnings printed while importing torch) and prefixes every line after it
by rank, as for any worker.

Spares are used in single-agent jobs only (``--nnodes`` max 1). They were kept out of
multi-agent jobs because a planned stop's step used to come from the announcing agent's workers
alone, which a worker started from a spare (50 ms, next to one started fresh in a second) could
already have passed. The agents now agree on the step from every agent's proposal
(``stopping.py``), which removes that reason; spares in multi-agent jobs are still off because
nothing tests them there yet.

A plain ``Popen`` is used instead when the command is not ``<this Python> [-u] script ...`` or
``<this Python> [-u] -m module ...`` (``--no-python``, other interpreter flags), with
``--no-spares``, or when the slot's spare is gone (died, or not startable).

Differences from a fresh interpreter, by design: the preloaded modules were imported with the
agent's environment and without the script's directory on ``sys.path`` (a ``torch.py`` next to
the script would not shadow the real one), and variables read at interpreter start or by the
preloaded modules at import (``PYTHONHASHSEED``, ``PYTHONWARNINGS``, ``OMP_NUM_THREADS``) come
from the agent's environment; the per-worker variables the agent adds (``RANK``,
``LOCAL_RANK``, ``MASTER_*``, ``LATTICE_*``, ...) are not read by anything at import time
(``lattice`` reads its ``LATTICE_*`` variables, ``LATTICE_CONTROL`` included, when the session
is created, i.e. in the worker). Warnings already shown once by a preloaded module's import
are not shown again. Each idle spare holds the memory of its imports (a few hundred MB with
torch).

Lifetimes: PDEATHSIG is delivered when the *thread* that started a process exits, so spares
are started from the thread that runs the agent loop, never from a short-lived helper thread.
A spare exits when it reads end-of-file on its pipe (the agent closed it, or died), and the
pool kills its process group when it stops.

This module is also the spare's program (``python -u -c _BOOT <this file> <fd> <preload>...``):
its top-level imports are standard library only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("lattice.agent")
DEFAULT_PRELOAD = ("torch", "torch._dynamo", "lattice")
MARK = b"\x00lattice-spare-assigned\n"  # written by a spare to stdout and stderr after its handoff
# the spare's bootstrap: drop sys.path[0] ('' for -c: the agent's cwd) before importing anything,
# then run this file (by path: works whether or not lattice is importable from the spare)
_BOOT = ("import sys\nif not sys.flags.safe_path: del sys.path[0]\n"
         "import runpy\nrunpy.run_path(sys.argv[1], run_name='__lattice_spare__')")
_INTERPRETER_FLAGS = {"-u"}
_OWN_FRAMES = {"<string>", __file__}  # the bootstrap's and this file's frames in a worker's traceback


def die_with_parent(parent: int) -> None:
    """In the child: get SIGKILL when the agent dies (Linux), so no worker outlives a killed agent.

    ``parent`` is the agent's pid: if it died before the request took effect, exit now.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)


def python_target(command: Sequence[str]) -> tuple[bool, str, list[str]] | None:
    """``(is_module, script_or_module, args)`` if ``command`` runs a script (or ``-m`` module) with
    this agent's Python and only flags a spare reproduces; ``None`` otherwise."""
    if not command or not _same_file(command[0], sys.executable):
        return None
    i = 1
    while i < len(command) and command[i] in _INTERPRETER_FLAGS:
        i += 1
    rest = list(command[i:])
    if len(rest) >= 2 and rest[0] == "-m":
        return True, rest[1], rest[2:]
    if rest and not rest[0].startswith("-"):
        return False, rest[0], rest[1:]
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Spare:
    """One idle spare: its process and the write end of its assignment pipe."""

    def __init__(self, proc: subprocess.Popen[bytes], pipe: int):
        self.proc, self.pipe = proc, pipe

    def close_pipe(self) -> None:
        if self.pipe >= 0:
            _close(self.pipe)
            self.pipe = -1

    def discard(self) -> None:
        """Stop the spare (close its pipe, kill its group) and reap it."""
        self.close_pipe()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            log.warning("spare %d did not exit after SIGKILL", self.proc.pid)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SparePool:
    """One warm spare per local worker slot, for ``command`` (see the module docstring).

    Use from one long-lived thread (the agent loop): spares get PDEATHSIG from that thread.
    """

    def __init__(self, command: Sequence[str], workdir: Path, preload: Sequence[str] = DEFAULT_PRELOAD,
                 env: Mapping[str, str] | None = None):
        if python_target(command) is None:
            raise ValueError(f"spares need `{sys.executable} [-u] script|-m module ...`, got {list(command)}")
        self.python = command[0]
        self.workdir = workdir
        self.preload = list(preload)
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self._spares: dict[int, Spare] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def usable(command: Sequence[str]) -> bool:
        return python_target(command) is not None

    def fill(self, slots: int) -> None:
        """Start a spare for every slot in ``range(slots)`` that has none."""
        for slot in range(slots):
            self.fill_slot(slot)

    def fill_slot(self, slot: int) -> None:
        """Start a spare for ``slot`` unless it has one."""
        if slot not in self._spares:
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        if self._closed:
            return
        spare_file = str(Path(__file__).resolve())
        rfd, wfd = os.pipe()
        try:
            proc = subprocess.Popen(
                [self.python, "-u", "-c", _BOOT, spare_file, str(rfd), *self.preload], env=self.env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(rfd,), start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, os.getpid()))
        except OSError as exc:
            log.warning("could not start a spare worker process (%s); the next worker starts fresh", exc)
            _close(wfd)
            return
        finally:
            _close(rfd)
        with self._lock:
            self._spares[slot] = Spare(proc, wfd)

    def launch(self, slot: int, command: Sequence[str], env: Mapping[str, str],
               cwd: str | None = None) -> subprocess.Popen[bytes] | None:
        """Run ``command`` with ``env`` in ``cwd`` in the slot's spare.

        Returns the worker's process, or ``None`` if there was no live spare to use (the caller
        starts the worker itself). Either way the slot is empty afterwards: ``fill`` starts its
        replacement.
        """
        target = python_target(command)
        with self._lock:
            spare = self._spares.pop(slot, None)
        proc = None
        if spare is not None and spare.proc.poll() is not None:
            log.warning("spare %d for local rank %d exited with %s; starting the worker fresh",
                        spare.proc.pid, slot, spare.proc.returncode)
        elif target is not None and spare is not None:
            is_module, name, args = target
            self._count += 1
            path = self.workdir / f"assign-{os.getpid()}-{self._count}.json"
            try:
                self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(fd, "w") as f:
                    json.dump({"module": is_module, "target": name, "args": args, "env": dict(env),
                               "cwd": cwd or os.getcwd()}, f)
                os.write(spare.pipe, str(path).encode() + b"\n")
                proc = spare.proc
            except OSError as exc:  # BrokenPipeError: the spare died since we looked
                log.warning("spare %d for local rank %d is unusable (%s); starting the worker fresh",
                            spare.proc.pid, slot, exc)
                path.unlink(missing_ok=True)
            spare.close_pipe()  # end-of-file: the spare reads its whole assignment
        if proc is None and spare is not None:
            spare.discard()
        return proc

    def close(self) -> None:
        """Stop every idle spare (workers already handed out are not the pool's any more)."""
        with self._lock:
            self._closed = True
            spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            spare.discard()

    def pids(self) -> list[int]:
        with self._lock:
            return [s.proc.pid for s in self._spares.values()]


# -- the spare's side ------------------------------------------------------------------------
def _low_priority(fn: Callable[..., None], *args: object) -> None:
    """Run ``fn`` in this thread at the lowest CPU priority (Linux: nice is per thread), so a
    spare's imports never slow the training on the node; the thread ends with ``fn``."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
    fn(*args)


def _serve(fd: int, preload: Sequence[str]) -> None:
    """In the spare: import ``preload``, wait for the assignment on ``fd``, become the worker."""
    import importlib
    import runpy

    handed_off = threading.Event()

    def load(names: Sequence[str]) -> None:
        for name in names:
            if handed_off.is_set():
                return  # the worker imports the rest itself, at its own priority
            try:
                importlib.import_module(name)
            except Exception:  # not installed, or broken: the worker imports (and reports) it itself
                pass

    # numpy first, here: its BLAS starts a thread pool at import, which would inherit the low priority
    load([n for n in ("numpy",) if any(p == "torch" or p.startswith("torch.") for p in preload)])
    loader = threading.Thread(target=_low_priority, args=(load, preload), name="lattice-spare-preload")
    loader.start()
    with os.fdopen(fd, "rb") as pipe:
        data = pipe.read()
    handed_off.set()
    loader.join()
    if not data.strip():
        sys.exit(0)  # the agent stopped the pool (or died)
    path = data.decode().strip()
    with open(path) as f:
        a = json.load(f)
    os.unlink(path)
    os.environ.clear()
    os.environ.update(a["env"])
    os.chdir(a["cwd"])
    target = a["target"]
    if not sys.flags.safe_path:  # as the interpreter does (unless -P / PYTHONSAFEPATH)
        sys.path.insert(0, os.getcwd() if a["module"] else os.path.dirname(os.path.realpath(target)))
    importlib.invalidate_caches()
    sys.argv = [target, *a["args"]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, MARK)
    os.write(2, MARK)
    try:
        if a["module"]:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # report it as the interpreter would: without the spare's frames
        tb = exc.__traceback__
        while tb is not None and (tb.tb_frame.f_code.co_filename in _OWN_FRAMES
                                  or tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")):
            tb = tb.tb_next
        tb = tb or exc.__traceback__
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        sys.exit(1)


if __name__ == "__lattice_spare__":
    _serve(int(sys.argv[2]), sys.argv[3:])
