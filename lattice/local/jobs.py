"""The operations behind ``lattice local``: apply, scale, delete, and reading jobs for ``get``.

They act on a job's state directory (:mod:`.state`) and its controller process; ``cli.py`` only
parses arguments and prints. Each operation validates first and names the bad input.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..k8s.model import TERMINAL, iso
from ..k8s.spec import JobSpec, parse_job
from . import procs, translate
from .fields import check_fields
from .observe import PodRecord
from .state import JobDir, all_jobs, write_json

CONTROLLER_START = 20.0  # seconds `apply` waits for the controller's first status


def load_manifests(path: str) -> list[dict[str, Any]]:
    """The TrainingJob documents of a YAML (or JSON) file; ``-`` reads stdin."""
    text = sys.stdin.read() if path == "-" else _read(path)
    try:
        import yaml
    except ImportError:  # JSON is YAML too; without PyYAML only JSON files can be read
        import json

        try:
            docs = [json.loads(text)]
        except ValueError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install 'lattice[operator]'), "
                              "or give the job as JSON") from None
    else:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not docs:
        raise ConfigError(f"{path}: no document in the file; expected a TrainingJob")
    return docs


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"-f {path}: cannot read it ({exc.strerror})") from None


def validate(obj: dict[str, Any], workdir: str) -> tuple[JobSpec, list[str]]:
    """Parse one TrainingJob and check that it can run here; returns the spec and info notes."""
    if not isinstance(obj, dict):
        raise ConfigError(f"a TrainingJob must be a mapping, got {type(obj).__name__}")
    check_fields(obj)
    spec = parse_job(obj)
    settings = translate.LocalSettings("127.0.0.1:0", "/nonexistent", workdir)
    local = translate.localize(spec, settings)
    notes = translate.notes(local)
    if spec.rendezvous is not None:
        notes.append(f"spec.rendezvous ({spec.rendezvous.backend}) is replaced locally by an embedded server")
    translate.launch(local, 0, settings)  # the command and the working directory work here
    return spec, notes


def find(name: str, namespace: str | None) -> JobDir:
    """The job called ``name``: in ``namespace``, or (when None) the only one of that name."""
    if namespace is not None:
        return JobDir(namespace, name).require()
    found = [j for j in all_jobs(None) if j.name == name]
    if len(found) == 1:
        return found[0]
    if not found:
        return JobDir("default", name).require()  # raises "not found"
    spaces = ", ".join(j.namespace for j in found)
    raise ConfigError(f"trainingjob {name!r} exists in namespaces {spaces}; say which with -n NAMESPACE")


def controller_alive(job: JobDir) -> bool:
    """The job's controller process is running."""
    recorded = job.controller_pid()
    if recorded is None or not procs.alive(*recorded):
        return False
    pid = recorded[0]
    try:
        return b"lattice" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def apply(obj: dict[str, Any], workdir: str, local: dict[str, Any]) -> tuple[JobDir, str, list[str]]:
    """Store the job (new: generation 1; changed: generation + 1); returns it,
    ``created``/``configured``/``unchanged`` and the info notes. The caller starts the
    controller of a new job."""
    spec, notes = validate(obj, workdir)
    job = JobDir(spec.namespace, spec.name)
    with job.locked():
        if job.exists():
            return job, _update(job, obj), notes
        job.remove()  # what an earlier, deleted job of this name left (never checkpoints or logs)
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        meta.update(namespace=spec.namespace, creationTimestamp=iso(time.time()), uid=str(uuid.uuid4()), generation=1)
        stored.pop("status", None)
        job.write_job(stored)
        checkpoint = translate.checkpoint_dir(spec.checkpoint, job.checkpoints, workdir)
        write_json(job.local_file, {**local, "workdir": workdir, "checkpointDir": checkpoint})
    return job, "created", notes


def _update(job: JobDir, obj: dict[str, Any]) -> str:
    if not controller_alive(job):
        phase = job.read_status().get("phase")
        state = f"has ended ({phase})" if phase in TERMINAL else "has no running controller"
        raise ConfigError(f'trainingjob "{job.name}" in namespace "{job.namespace}" {state}; '
                          f"delete it first to run it again: lattice local delete {job.name} -n {job.namespace}")
    stored = job.read_job()
    if stored.get("spec") == obj.get("spec"):
        return "unchanged"
    stored["spec"] = copy.deepcopy(obj["spec"])
    stored["metadata"]["generation"] = int(stored["metadata"].get("generation") or 0) + 1
    job.write_job(stored)
    return "configured"


def start_controller(job: JobDir, workdir: str) -> int:
    """Start the job's controller as a daemon (its own session, output in ``controller.log``);
    wait until it wrote its first status. Returns its pid."""
    job.pid_file.unlink(missing_ok=True)
    log = job.controller_log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "lattice.local.controller", str(job.path)], cwd=workdir,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + CONTROLLER_START
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = job.controller_log.read_text(errors="replace").splitlines()[-15:]
            raise ConfigError(f"the controller of {job.name} exited with {proc.returncode}:\n" + "\n".join(tail))
        if job.status_file.exists():
            return proc.pid
        time.sleep(0.1)
    raise ConfigError(f"the controller of {job.name} wrote no status within {CONTROLLER_START:.0f}s; "
                      f"see {job.controller_log}")


def scale(job: JobDir, replicas: int) -> None:
    """Set ``spec.replicas`` (the controller picks it up); must lie within minSize..maxSize."""
    with job.locked():
        stored = job.read_job()
        spec = parse_job(stored)
        if not spec.min_size <= replicas <= spec.max_size:
            raise ConfigError(f"--replicas {replicas} is outside spec.minSize..spec.maxSize "
                              f"({spec.min_size}..{spec.max_size}) of trainingjob {job.name}; pick a value in "
                              "that range, or change minSize/maxSize and apply the job again")
        if stored["spec"].get("replicas") == replicas:
            return
        stored["spec"]["replicas"] = replicas
        stored["metadata"]["generation"] = int(stored["metadata"].get("generation") or 0) + 1
        job.write_job(stored)


def delete(job: JobDir, timeout: float, purge: bool = False) -> list[str]:
    """Stop the controller (its agents stop gracefully), kill whatever is left after ``timeout``
    seconds, and remove the job's state. Returns what had to be killed."""
    recorded, killed = job.controller_pid(), []
    if controller_alive(job) and recorded is not None:
        os.kill(recorded[0], signal.SIGTERM)
        if not procs.wait_gone([recorded[0]], timeout):
            killed.append(f"controller (pid {recorded[0]})")
            procs.kill_tree(*recorded)
    for raw in job.read_pods():
        rec = PodRecord.from_dict(raw)
        if procs.alive(rec.pid, rec.started):
            killed.append(f"{rec.name} (pid {rec.pid})")
            procs.kill_tree(rec.pid, rec.started)
    job.remove(purge)
    return killed


def read_object(job: JobDir) -> dict[str, Any]:
    """The job as ``kubectl get -o json`` shows it: the applied object with its status."""
    obj = job.read_job()
    obj["status"] = job.read_status()
    return obj
