"""From a TrainingJob to the local process that stands in for one worker pod: a small "kubelet".

The pod is the operator's own (:func:`lattice.k8s.render.pod`), rendered for a spec whose
rendezvous is the job's embedded server and whose checkpoint URL is a local directory; this
module then does what a kubelet would with its training container:

- ``env``: ``value`` entries with ``$(VAR)`` expanded as Kubernetes does; ``valueFrom`` field
  references to the pod's name, namespace, IP (127.0.0.1) and node name; other ``valueFrom``
  sources (secrets, config maps) have no local meaning and are left out (with a note);
- ``command``: ``$(VAR)`` expanded the same way; ``lattice`` runs as ``python -m lattice.cli``
  and a training command starting with ``python``/``python3`` runs with the interpreter that
  runs Lattice (the same environment); three local agent timings are added (``--ttl``,
  ``--last-call``: one machine, nothing far away);
- ``workingDir`` -> the working directory, relative to where ``apply`` ran (default: there);
- ``image``, resources, probes, volumes and other containers: ignored, with a note each.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..k8s import render
from ..k8s.spec import CheckpointSpec, JobSpec, RendezvousSpec

PYTHONS = ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}")
_IGNORED = ("resources", "volumeMounts", "ports", "livenessProbe", "readinessProbe", "startupProbe",
            "securityContext", "envFrom")
LOCAL_IP = "127.0.0.1"


@dataclasses.dataclass(frozen=True)
class LocalSettings:
    """Where the local job's pieces are: the embedded rendezvous, storage, working directory,
    and the agent timings (shorter than a cluster's: one machine, nothing far away)."""

    endpoint: str  # HOST:PORT of the job's embedded rendezvous server
    checkpoint_dir: str
    workdir: str  # the directory `lattice local apply` ran in
    ttl: float = 5.0
    last_call: float = 2.0


@dataclasses.dataclass(frozen=True)
class Launch:
    """One worker's process: arguments, environment additions, directory, and the seconds a
    graceful stop may take before SIGKILL (the pod's ``terminationGracePeriodSeconds``)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    grace: float


def localize(spec: JobSpec, settings: LocalSettings) -> JobSpec:
    """``spec`` with the embedded rendezvous and the local checkpoint directory filled in."""
    return dataclasses.replace(spec, rendezvous=RendezvousSpec("embedded", settings.endpoint),
                               checkpoint=dataclasses.replace(spec.checkpoint, url=settings.checkpoint_dir))


def checkpoint_dir(checkpoint: CheckpointSpec, default: Path, workdir: str) -> str:
    """``checkpoint.url`` (a relative path from ``workdir``; URLs unchanged) or ``default``."""
    url = checkpoint.url
    if url is None:
        return str(default)
    if "://" in url:
        return url
    return os.path.normpath(os.path.join(workdir, os.path.expanduser(url)))


def training_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The container the operator injected the agent into."""
    return next(c for c in pod["spec"]["containers"] if (c.get("command") or [None])[0] == "lattice")


def notes(spec: JobSpec) -> list[str]:
    """What of the template has no meaning on one machine (``apply`` prints these once)."""
    pod = render.pod(spec, 0)
    main = training_container(pod)
    out = [f"image {main.get('image')!r} is ignored locally: the command runs on this machine"]
    others = [c.get("name") for c in pod["spec"]["containers"] if c is not main]
    if others:
        out.append(f"containers {others} are ignored locally: only the training container runs")
    users = {**main, "ports": [p for p in main.get("ports") or [] if p.get("containerPort") != render.METRICS_PORT]}
    out += [f"container {main.get('name')!r}: {key} is ignored locally" for key in _IGNORED if users.get(key)]
    out += [f"env {e['name']}: valueFrom {sorted(e['valueFrom'])} has no local meaning; not set"
            for e in main.get("env") or () if "valueFrom" in e and _field_value(e, pod) is None]
    if pod["spec"].get("volumes"):
        out.append("volumes are ignored locally")
    return out


def _field_value(entry: Mapping[str, Any], pod: Mapping[str, Any]) -> str | None:
    path = (entry.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
    local = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
             "status.podIP": LOCAL_IP, "status.hostIP": LOCAL_IP, "spec.nodeName": "localhost"}
    return local.get(path) if path else None


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (``$$`` escapes a dollar; unknown references stay)."""
    out, i = [], 0
    while i < len(value):
        end = value.find(")", i) if value.startswith("$(", i) else -1
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif end > 0 and value[i + 2:end] in env:
            out.append(env[value[i + 2:end]])
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def container_env(container: Mapping[str, Any], pod: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment as a kubelet sets it (in order, each entry may use earlier ones)."""
    env: dict[str, str] = {}
    for e in container.get("env") or ():
        if "valueFrom" in e:
            if (value := _field_value(e, pod)) is not None:
                env[e["name"]] = value
            continue
        env[e["name"]] = expand(str(e.get("value", "")), env)
    return env


def command(container: Mapping[str, Any], env: Mapping[str, str], settings: LocalSettings) -> list[str]:
    """The agent's command line: ``lattice agent <flags> --no-python -- <training command>``."""
    argv = [expand(a, env) for a in container["command"]]
    split = argv.index("--")
    head, training = argv[:split], argv[split + 1:]
    if training and training[0] in PYTHONS:
        training[0] = sys.executable
    local = ["--ttl", f"{settings.ttl:g}", "--last-call", f"{settings.last_call:g}"]
    flags = head[2:]
    if "--metrics-port" in flags:  # one port per pod on a cluster; local agents share a host
        i = flags.index("--metrics-port")
        del flags[i:i + 2]
    if "--metrics-addr" in flags:
        i = flags.index("--metrics-addr")
        del flags[i:i + 2]
    return [sys.executable, "-m", "lattice.cli", head[1], *local, *flags, "--", *training]


def launch(spec: JobSpec, index: int, settings: LocalSettings) -> Launch:
    """The ``lattice agent`` process for worker ``index`` of ``spec`` (already localized)."""
    pod = render.pod(spec, index)
    main = training_container(pod)
    env = container_env(main, pod)
    workdir = main.get("workingDir")
    cwd = os.path.normpath(os.path.join(settings.workdir, workdir)) if workdir else settings.workdir
    if not os.path.isdir(cwd):
        raise ConfigError(f"container {main.get('name')!r}: workingDir {workdir!r} is not a directory "
                          f"here ({cwd})")
    grace = float(pod["spec"].get("terminationGracePeriodSeconds") or render.DEFAULT_GRACE)
    return Launch(argv=command(main, env, settings), env={**env, "PYTHONUNBUFFERED": "1"}, cwd=cwd,
                  grace=grace)
