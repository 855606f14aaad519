"""The state directory of one local TrainingJob: what ``kubectl`` would keep in the API server.

``$LATTICE_LOCAL_HOME`` (default ``~/.lattice/local``) holds ``<namespace>/<name>/`` per job:

- ``job.json``: the applied TrainingJob (``metadata.generation`` counts spec changes, as on a
  cluster; ``lattice local scale`` rewrites ``spec.replicas`` under a file lock);
- ``status.json``: the status the controller writes after every reconcile;
- ``pods.json``: the agent processes ("pods") the controller runs, with their pids, so
  ``delete`` can clean up even after the controller died;
- ``local.json``: where ``apply`` ran and the local agent timings; ``memory.json``: what the
  reconcile core asked to remember; ``events.jsonl``: the events it emitted;
- ``controller.pid`` / ``controller.log``, ``endpoint`` (the embedded rendezvous);
- ``logs/<pod>.log`` (an agent and its workers), ``checkpoints/`` (the default storage).

Every JSON file is replaced atomically (write a temporary file, fsync, rename), so a reader
never sees half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

HOME_ENV = "LATTICE_LOCAL_HOME"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a Kubernetes object name (DNS subdomain)
KEEP_ON_DELETE = ("checkpoints", "logs")  # outlive the job, like a cluster's storage and logs


def home() -> Path:
    """The root of all local jobs: ``$LATTICE_LOCAL_HOME`` or ``~/.lattice/local``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".lattice" / "local"


def check_name(kind: str, value: str) -> str:
    """``value`` if it is a valid Kubernetes name, else ConfigError naming ``kind``."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{kind} {value!r} is not a valid name: use lowercase letters, digits, '-' "
                          "and '.', starting and ending with a letter or digit")
    return value


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically with ``data`` as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


class JobDir:
    """The files of one job (``<home>/<namespace>/<name>``)."""

    def __init__(self, namespace: str, name: str, root: Path | None = None):
        self.namespace, self.name = check_name("namespace", namespace), check_name("name", name)
        self.path = (root or home()) / namespace / name
        self.job_file, self.status_file = self.path / "job.json", self.path / "status.json"
        self.pods_file, self.pid_file = self.path / "pods.json", self.path / "controller.pid"
        self.controller_log, self.endpoint_file = self.path / "controller.log", self.path / "endpoint"
        self.logs, self.checkpoints = self.path / "logs", self.path / "checkpoints"
        self.local_file, self.memory_file = self.path / "local.json", self.path / "memory.json"
        self.events_file = self.path / "events.jsonl"

    def exists(self) -> bool:
        return self.job_file.exists()

    def require(self) -> JobDir:
        """Self, or ConfigError when no such job was applied."""
        if not self.exists():
            raise ConfigError(f'trainingjob "{self.name}" not found in namespace "{self.namespace}" '
                              f"(under {self.path.parent}); apply it with `lattice local apply -f JOB.yaml`")
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the job's lock (apply and scale read-modify-write ``job.json`` under it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read_job(self) -> dict[str, Any]:
        return read_json(self.job_file, {})

    def write_job(self, job: dict[str, Any]) -> None:
        write_json(self.job_file, job)

    def read_status(self) -> dict[str, Any]:
        return read_json(self.status_file, {})

    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.status_file, status)

    def read_pods(self) -> list[dict[str, Any]]:
        return read_json(self.pods_file, [])

    def write_pods(self, pods: list[dict[str, Any]]) -> None:
        write_json(self.pods_file, pods)

    def controller_pid(self) -> tuple[int, int | None] | None:
        """The controller's pid and process start time (``controller.pid``), if recorded."""
        try:
            parts = self.pid_file.read_text().split()
            return int(parts[0]), (int(parts[1]) if len(parts) > 1 else None)
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def log_of(self, pod: str) -> Path:
        return self.logs / f"{pod}.log"

    def remove(self, purge: bool = False) -> None:
        """Remove the job's state; keep ``checkpoints/`` and ``logs/`` unless ``purge``."""
        if purge:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for entry in list(self.path.iterdir()) if self.path.exists() else []:
            if entry.name in KEEP_ON_DELETE or entry.name == ".lock":
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def all_jobs(namespace: str | None, root: Path | None = None) -> list[JobDir]:
    """The applied jobs of ``namespace`` (every namespace if None), sorted by namespace and name."""
    base = root or home()
    spaces = [namespace] if namespace is not None else sorted(p.name for p in base.glob("*") if p.is_dir())
    jobs = []
    for ns in spaces:
        for d in sorted((base / ns).glob("*/job.json")):
            with contextlib.suppress(ConfigError):
                jobs.append(JobDir(ns, d.parent.name, base))
    return jobs
