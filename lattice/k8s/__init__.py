"""The operator's core, free of kopf and the Kubernetes client, so ``lattice local`` can use it.

- :mod:`.model`: the observations, actions, status and plan (frozen dataclasses);
- :mod:`.spec`: parse and validate a ``TrainingJob`` (dict) into a frozen :class:`JobSpec`;
- :mod:`.reconcile`: the pure decision ``reconcile(spec, observed, now) -> Plan``;
- :mod:`.render`: the worker pods and the headless Service, as plain dicts.

The kopf layer (``operator/lattice_operator``) and ``lattice local`` only gather observations
and apply the plan's actions; every decision is made in :func:`reconcile`.
"""

from __future__ import annotations

from .model import (
    PHASES,
    Condition,
    CreateWorker,
    DeleteWorker,
    EmitEvent,
    Memory,
    Observed,
    Plan,
    Status,
    Worker,
)
from .reconcile import reconcile, worker_name
from .spec import GROUP, KIND, PLURAL, VERSION, CheckpointSpec, JobSpec, RendezvousSpec, parse_job

__all__ = [
    "GROUP", "KIND", "PLURAL", "VERSION", "PHASES",
    "CheckpointSpec", "JobSpec", "RendezvousSpec", "parse_job",
    "Condition", "CreateWorker", "DeleteWorker", "EmitEvent", "Memory", "Observed", "Plan",
    "Status", "Worker", "reconcile", "worker_name",
]
