"""Running ``lattice run`` / ``lattice agent`` and a rendezvous server as real processes in tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kv_support import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests" / "helpers" / "agent_worker.py")
LATTICE = [sys.executable, "-m", "lattice.cli"]


class Proc:
    """A process in its own group whose merged output is collected line by line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def mark(self) -> int:
        """A position in the output: ``wait_for(..., after=mark)`` looks only at later lines."""
        return len(self.lines)

    def wait_for(self, pred: Callable[[str], bool], timeout: float, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        seen = after
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if pred(line):
                    return line
            seen = len(self.lines)
            if self.proc.poll() is not None and seen == len(self.lines):
                break
            time.sleep(0.05)
        events = [ln for ln in self.lines if not re.search(r"\]: step \d+$", ln)]
        raise AssertionError(f"no matching line within {timeout}s; output other than steps:\n"
                             + "\n".join(events[-40:]) + "\nlast lines:\n" + "\n".join(self.lines[-5:]))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def serve(cwd: Path) -> tuple[Proc, str]:
    """``lattice rendezvous serve`` on a free port with 1 s session TTLs allowed."""
    port = free_port()
    p = Proc([*LATTICE, "rendezvous", "serve", "--host", "127.0.0.1", "--port", str(port),
              "--min-session-ttl", "1"], cwd)
    deadline = time.monotonic() + 20
    import urllib.request

    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status/leader", timeout=1).read()
            return p, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise AssertionError("rendezvous server did not start:\n" + p.text)


def last_step_before(p: Proc, marker: str) -> int:
    """The last step a worker of ``p`` completed before the output line ``marker``."""
    last = 0
    for line in p.lines:
        if line == marker:
            return last
        if m := re.search(r"\]: step (\d+)$", line):
            last = int(m.group(1))
    raise AssertionError(f"{marker!r} not in output")


def start_step(line: str) -> int:
    """The step in a worker's ``start step N world W`` line."""
    return int(re.search(r"start step (\d+)", line).group(1))  # type: ignore[union-attr]


def leave_gracefully(survivor: Proc, *leavers: Proc) -> tuple[str, int]:
    """SIGTERM ``leavers`` at once (each exits 0 after the planned checkpoint); the survivor's
    restart line, alone, and its step."""
    mark = survivor.mark()
    for p in leavers:
        p.signal(signal.SIGTERM)
    for p in leavers:
        assert p.wait(60) == 0, p.text
    down = survivor.wait_for(lambda ln: "world 1" in ln and "start step" in ln, 60, after=mark)
    return down, start_step(down)


def wait_committed(where: Path | str, at_least: int, timeout: float = 60) -> int:
    """Wait until ``where`` (a checkpoint directory or URL) holds a committed checkpoint of step
    ``at_least`` or later (every rank's part is in: the workers of different agents drift
    apart); returns its step."""
    from lattice.core.stores import open_store

    store = open_store(str(where))
    deadline = time.monotonic() + timeout
    while True:
        steps = [s for s in store.list_committed() if s >= at_least]
        if steps:
            return max(steps)
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint of step {at_least} or later was committed in {where} in {timeout} s")
        time.sleep(0.1)
