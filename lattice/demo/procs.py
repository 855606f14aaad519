"""Helpers of the elastic demo: agents as subprocesses with compact, prefixed output, and the
training log (JSON lines written by rank 0 of :mod:`lattice.demo.ddp_train`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

_LOGLINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) lattice\.\w+: \[job=\S+ node=\S+ round=\S+(?: rank=\S+)?\] "
                      r"(?P<msg>.*)$")
_KEEP = ("running as rank", "event:", "ended:", "worker exited", "planned stop", "restart budget",
         "failed on another node")
_PLAIN = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) lattice\.\w+: (?P<msg>.*)$")
_WORKER = re.compile(r"^\[rank(?P<rank>\d+)\]: (?:\[rank\d+\]: )?(?P<msg>.*)$")
_WORKER_KEEP = re.compile(r"^(rank \d+ of \d+, pid|restored step|step \d+ loss|done at step|\w*(Error|Exception)\b)")
_PID = re.compile(r"^rank \d+ of \d+, pid (\d+),")
WIDTH = 120


def compact(line: str) -> str | None:
    """What the user sees of one agent output line (None: not shown)."""
    line = line.rstrip("\n")
    if m := _LOGLINE.match(line) or _PLAIN.match(line):
        msg = m["msg"]
        if m["level"] in ("WARNING", "ERROR") or any(k in msg for k in _KEEP):
            return _shorten(f"{m['level'].lower() + ': ' if m['level'] != 'INFO' else ''}{msg}")
        return None
    if m := _WORKER.match(line):
        return _shorten(f"rank {m['rank']}| {m['msg']}") if _WORKER_KEEP.match(m["msg"]) else None
    if not line.strip() or line[0].isspace() or line.startswith(("Traceback", "-----", "Exception occurred")):
        return None
    return _shorten(line)


def _shorten(text: str) -> str:
    text = re.sub(r"PeerLost\(round=\d+, nodes=\([^)]*\), reason='([^']*)'\)", r"peer lost (\1)", text)
    text = re.sub(r"JoinPending\(round=\d+, nodes=\([^)]*\)\)", "a new node is waiting", text)
    return text if len(text) <= WIDTH else text[:WIDTH - 3] + "..."


class Console:
    """Prints lines with the seconds since ``t0``; one writer at a time."""

    def __init__(self, t0: float, out: TextIO | None = None):
        self.t0, self.out, self._lock = t0, out or sys.stdout, threading.Lock()

    def say(self, text: str, who: str = "demo") -> None:
        with self._lock:
            self.out.write(f"{time.time() - self.t0:6.1f}s [{who}] {text}\n")
            self.out.flush()


class Agent:
    """One ``lattice agent`` subprocess; its output goes through :func:`compact` to the console."""

    def __init__(self, name: str, command: list[str], console: Console, env: dict[str, str], raw_log: Path):
        self.name, self.console = name, console
        self.worker_pid: int | None = None
        self._raw = raw_log.open("a")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **env}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"demo-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._raw.write(f"{time.time() - self.console.t0:7.2f}s {line}")
            m = _WORKER.match(line.rstrip("\n"))
            if m and (pid := _PID.match(m["msg"])):
                self.worker_pid = int(pid.group(1))
            if (text := compact(line)) is not None:
                self.console.say(text, self.name)
        self._raw.close()

    def kill_worker(self) -> int:
        """SIGKILL this agent's (current) worker process; returns its pid."""
        if self.worker_pid is None:
            raise RuntimeError(f"{self.name}: no worker pid seen yet")
        os.kill(self.worker_pid, signal.SIGKILL)
        return self.worker_pid

    def terminate(self) -> None:
        """SIGTERM: a planned stop (the agent checkpoints with its peers, leaves and exits 0)."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


class TrainingLog:
    """The JSON lines rank 0 appends per step, read incrementally."""

    def __init__(self, path: Path):
        self.path, self.records, self._offset, self._partial = path, [], 0, ""

    def refresh(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with self.path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
            lines = (self._partial + chunk).split("\n")
            self._partial = lines.pop()
            self.records.extend(json.loads(ln) for ln in lines if ln.strip())
        return self.records

    @property
    def last(self) -> dict[str, Any] | None:
        return self.records[-1] if self.records else None

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                 alive: Callable[[], bool] = lambda: True) -> dict[str, Any]:
        """Wait until the latest or a later record satisfies ``pred``; TimeoutError after ``timeout``."""
        deadline, seen = time.monotonic() + timeout, max(len(self.refresh()) - 1, 0)
        while time.monotonic() < deadline and alive():
            for rec in self.refresh()[seen:]:
                if pred(rec):
                    return rec
            seen = len(self.records)
            time.sleep(0.05)
        raise TimeoutError(f"training did not reach: {what} (last record: {self.last})")
