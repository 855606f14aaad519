"""Helpers of the ``lattice local`` end-to-end tests: run the CLI against a state directory
under tmp_path, poll a job's status (bounded), read worker steps from the logs, and kill
every process a test started (each carries the test's ``LATTICE_LOCAL_HOME`` in its
environment, which finds even one whose parent forgot it)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "tests" / "local" / "train_until.py"


class Local:
    """``lattice local ...`` with ``LATTICE_LOCAL_HOME`` set to ``home``, run from ``cwd``."""

    def __init__(self, home: Path, cwd: Path):
        self.home, self.cwd = home, cwd
        self.env = {**os.environ, "LATTICE_LOCAL_HOME": str(home)}

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.Popen([sys.executable, "-m", "lattice.cli", "local", *args], cwd=self.cwd, env=self.env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and result.returncode != 0:
            raise AssertionError(f"lattice local {' '.join(args)} exited {result.returncode}:\n{out}\n{err}")
        return result

    def job_dir(self, name: str, namespace: str = "default") -> Path:
        return self.home / namespace / name

    def status(self, name: str, namespace: str = "default") -> dict[str, Any]:
        try:
            return json.loads((self.job_dir(name, namespace) / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def pods(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        try:
            return json.loads((self.job_dir(name, namespace) / "pods.json").read_text())
        except (FileNotFoundError, ValueError):
            return []

    def wait(self, name: str, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60,
             namespace: str = "default") -> dict[str, Any]:
        """Poll the status until ``pred`` holds; AssertionError (with the controller's log) after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(name, namespace)
            if status and pred(status):
                return status
            time.sleep(0.2)
        log = self.job_dir(name, namespace) / "controller.log"
        tail = log.read_text().splitlines()[-30:] if log.exists() else []
        raise AssertionError(f"{what}: not within {timeout}s; status {self.status(name, namespace)}\n"
                             + "\n".join(tail))

    def wait_log(self, name: str, index: int, text: str, timeout: float = 30, namespace: str = "default") -> None:
        """Wait until worker ``index``'s log contains ``text``; AssertionError (with its tail) after ``timeout``."""
        path = self.job_dir(name, namespace) / "logs" / f"{name}-worker-{index}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            time.sleep(0.2)
        tail = path.read_text(errors="replace").splitlines()[-20:] if path.exists() else []
        raise AssertionError(f"{text!r} not in {path.name} within {timeout}s:\n" + "\n".join(tail))

    def max_step(self, name: str, namespace: str = "default") -> int:
        """The highest training step any worker printed so far."""
        steps = [int(m.group(1)) for log in (self.job_dir(name, namespace) / "logs").glob("*.log")
                 for m in re.finditer(r"\]: step (\d+)$", log.read_text(errors="replace"), re.M)]
        return max(steps, default=0)

    def sweep(self) -> list[int]:
        """SIGKILL every process started with this home in its environment; returns their pids."""
        marker = f"LATTICE_LOCAL_HOME={self.home}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return found


def job_yaml(name: str, release: Path, *, replicas: int | None, min_size: int = 1, max_size: int = 3,
             sleep: float = 0.05, every: int = 10) -> str:
    """A TrainingJob exactly as a user writes it, with the test's training command."""
    replicas_line = f"  replicas: {replicas}\n" if replicas is not None else ""
    return f"""apiVersion: "exabits.ai/v1"
kind: TrainingJob
metadata:
  name: {name}
spec:
  minSize: {min_size}
  maxSize: {max_size}
{replicas_line}  maxRestarts: 3
  checkpoint:
    everySteps: {every}
  replicaSpecs:
    template:
      spec:
        containers:
          - name: trainingjob
            image: exabits/lattice-resnet
            imagePullPolicy: Always
            command: ["python", "-u", "{TRAIN}"]
            args: ["--release", "{release}", "--sleep", "{sleep}"]
            env:
              - name: GREETING
                value: "hello"
"""
