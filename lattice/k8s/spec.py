"""Parse and validate a ``TrainingJob`` (``exabits.ai/v1``) into a frozen :class:`JobSpec`.

The CRD's schema already rejects most bad specs on a cluster; this module checks them again
(``lattice local`` has no API server) and every error names the field, e.g.
``spec.maxSize (1) must be >= spec.minSize (2)``.

Defaults (the same as the CRD's): ``replicas`` absent -> ``maxSize`` (start as large as allowed,
settle at what the cluster can schedule); ``maxRestarts`` 3; ``nprocPerNode`` 1; ``rendezvous``
absent -> the caller's default (the operator's Consul, or the local embedded server).
Operator timings that are not part of the CRD's spec come from annotations on the job:

- ``exabits.ai/unschedulable-timeout`` (seconds, default 120): how long a worker pod may stay
  unschedulable before the job gives up on it (down to ``minSize``);
- ``exabits.ai/retry-backoff`` (seconds, default 60): the wait before the job tries again to grow
  back after giving up; it doubles after each failed retry up to
  ``exabits.ai/max-retry-backoff`` (seconds, default 600).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from ..core.errors import ConfigError

GROUP, VERSION, PLURAL, KIND = "exabits.ai", "v1", "trainingjobs", "TrainingJob"
API_VERSION = f"{GROUP}/{VERSION}"
BACKENDS = ("embedded", "consul", "etcd")
_TIMINGS = {  # annotation -> (JobSpec field, default seconds)
    "exabits.ai/unschedulable-timeout": ("unschedulable_timeout", 120.0),
    "exabits.ai/retry-backoff": ("retry_backoff", 60.0),
    "exabits.ai/max-retry-backoff": ("max_retry_backoff", 600.0),
}


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """``spec.checkpoint``: storage URL and policy, passed to the agent's environment."""

    url: str | None = None
    every_steps: int | None = None
    every_seconds: float | None = None
    keep: int | None = None


@dataclasses.dataclass(frozen=True)
class RendezvousSpec:
    """``spec.rendezvous``: the KV store the agents rendezvous through."""

    backend: str = "consul"
    endpoint: str | None = None


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One validated TrainingJob: identity, sizes, budgets, settings and the pod template.

    ``template`` is a deep copy of ``spec.replicaSpecs.template`` (treat it as read-only).
    ``desired`` is ``replicas`` clamped to ``min_size..max_size`` (``max_size`` when absent).
    """

    name: str
    namespace: str
    min_size: int
    max_size: int
    template: dict[str, Any] = dataclasses.field(compare=True, hash=False)
    replicas: int | None = None
    max_restarts: int = 3
    nproc_per_node: int = 1
    checkpoint: CheckpointSpec = CheckpointSpec()
    rendezvous: RendezvousSpec | None = None
    uid: str = ""
    generation: int = 0
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    unschedulable_timeout: float = 120.0
    retry_backoff: float = 60.0
    max_retry_backoff: float = 600.0

    @property
    def desired(self) -> int:
        """The worker count to drive towards: ``replicas`` clamped to ``min_size..max_size``."""
        want = self.max_size if self.replicas is None else self.replicas
        return max(self.min_size, min(self.max_size, want))

    @property
    def selector(self) -> str:
        """The worker pods' label selector, serialized (``status.selector``)."""
        return f"{JOB_LABEL}={self.name}"


JOB_LABEL = "exabits.ai/job"
INDEX_LABEL = "exabits.ai/worker-index"
ROLE_LABEL = "exabits.ai/role"


def _get(obj: Mapping[str, Any], path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if cur is None:
            return None
        if not isinstance(cur, Mapping):
            raise ConfigError(f"{path.rsplit('.', 1)[0]} must be a mapping, got {type(cur).__name__}")
        cur = cur.get(part)
    return cur


def _int(obj: Mapping[str, Any], path: str, *, minimum: int, default: int | None = None,
         required: bool = False) -> int | None:
    value = _get(obj, path)
    if value is None:
        if required:
            raise ConfigError(f"{path} is required (an integer >= {minimum})")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path} must be >= {minimum}, got {value}")
    return value


def _str(obj: Mapping[str, Any], path: str) -> str | None:
    value = _get(obj, path)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{path} must be a non-empty string, got {value!r}")
    return value


def _checkpoint(obj: Mapping[str, Any]) -> CheckpointSpec:
    if _get(obj, "spec.checkpoint") is None:
        return CheckpointSpec()
    secs = _get(obj, "spec.checkpoint.everySeconds")
    if secs is not None and (isinstance(secs, bool) or not isinstance(secs, int | float) or secs <= 0):
        raise ConfigError(f"spec.checkpoint.everySeconds must be a number > 0, got {secs!r}")
    return CheckpointSpec(url=_str(obj, "spec.checkpoint.url"),
                          every_steps=_int(obj, "spec.checkpoint.everySteps", minimum=1),
                          every_seconds=None if secs is None else float(secs),
                          keep=_int(obj, "spec.checkpoint.keep", minimum=1))


def _rendezvous(obj: Mapping[str, Any], default: RendezvousSpec | None) -> RendezvousSpec | None:
    if _get(obj, "spec.rendezvous") is None:
        return default
    backend = _str(obj, "spec.rendezvous.backend") or (default.backend if default else "consul")
    if backend not in BACKENDS:
        raise ConfigError(f"spec.rendezvous.backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    endpoint = _str(obj, "spec.rendezvous.endpoint")
    if endpoint is None and default is not None and default.backend == backend:
        endpoint = default.endpoint
    return RendezvousSpec(backend=backend, endpoint=endpoint)


def _template(obj: Mapping[str, Any]) -> dict[str, Any]:
    template = _get(obj, "spec.replicaSpecs.template")
    if not isinstance(template, Mapping):
        raise ConfigError("spec.replicaSpecs.template is required: a pod template with spec.containers")
    containers = _get(template, "spec.containers") if isinstance(template.get("spec"), Mapping) else None
    if not isinstance(containers, list) or not containers:
        raise ConfigError("spec.replicaSpecs.template.spec.containers must list at least one container")
    for i, c in enumerate(containers):
        where = f"spec.replicaSpecs.template.spec.containers[{i}]"
        if not isinstance(c, Mapping) or not c.get("name") or not c.get("image"):
            raise ConfigError(f"{where} needs a name and an image")
        for key in ("command", "args"):
            if c.get(key) is not None and (not isinstance(c[key], list)
                                           or not all(isinstance(x, str) for x in c[key])):
                raise ConfigError(f"{where}.{key} must be a list of strings, got {c[key]!r}")
    return copy.deepcopy(dict(template))


def _timings(annotations: Mapping[str, str]) -> dict[str, float]:
    out = {}
    for key, (field, default) in _TIMINGS.items():
        raw = annotations.get(key)
        try:
            out[field] = default if raw is None else float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"metadata.annotations[{key!r}] must be a number of seconds, got {raw!r}") from None
        if out[field] < 0:
            raise ConfigError(f"metadata.annotations[{key!r}] must be >= 0, got {raw!r}")
    return out


def parse_job(obj: Mapping[str, Any], default_rendezvous: RendezvousSpec | None = None) -> JobSpec:
    """Validate a TrainingJob object (as a dict) and return its :class:`JobSpec`.

    Args:
        obj: the whole object (``apiVersion``, ``kind``, ``metadata``, ``spec``).
        default_rendezvous: used when ``spec.rendezvous`` (or its endpoint) is absent.
    Raises:
        ConfigError: naming the bad field and what it must be.
    """
    if not isinstance(obj, Mapping):
        raise ConfigError(f"a TrainingJob must be a mapping, got {type(obj).__name__}")
    if obj.get("kind", KIND) != KIND or obj.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigError(f"expected apiVersion {API_VERSION} kind {KIND}, got "
                          f"{obj.get('apiVersion')!r} {obj.get('kind')!r}")
    if not isinstance(obj.get("spec"), Mapping):
        raise ConfigError("spec is required (minSize, maxSize, replicaSpecs.template)")
    name = _str(obj, "metadata.name")
    if name is None:
        raise ConfigError("metadata.name is required")
    lo = _int(obj, "spec.minSize", minimum=1, required=True)
    hi = _int(obj, "spec.maxSize", minimum=1, required=True)
    assert lo is not None and hi is not None
    if hi < lo:
        raise ConfigError(f"spec.maxSize ({hi}) must be >= spec.minSize ({lo})")
    meta = obj.get("metadata") or {}
    return JobSpec(
        name=name, namespace=_str(obj, "metadata.namespace") or "default",
        min_size=lo, max_size=hi, template=_template(obj),
        replicas=_int(obj, "spec.replicas", minimum=0),
        max_restarts=_int(obj, "spec.maxRestarts", minimum=0, default=3) or 0,
        nproc_per_node=_int(obj, "spec.nprocPerNode", minimum=1, default=1) or 1,
        checkpoint=_checkpoint(obj), rendezvous=_rendezvous(obj, default_rendezvous),
        uid=str(meta.get("uid") or ""), generation=int(meta.get("generation") or 0),
        labels=dict(meta.get("labels") or {}), **_timings(meta.get("annotations") or {}))
