"""``lattice local get``: the table ``kubectl get tj`` prints, from the same printer columns.

``COLUMNS`` mirrors ``additionalPrinterColumns`` of ``deploy/crd/trainingjobs.yaml`` (a test
compares them), evaluated on the same object (``metadata``, ``spec``, ``status``); ages are
written the way kubectl writes them (``45s``, ``3m20s``, ``5h``, ``2d3h``).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from ..k8s.model import parse_time

# (header, JSONPath, type): the CRD's printer columns; NAME comes first, as kubectl adds it
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Phase", ".status.phase", "string"),
    ("Ready", ".status.readyReplicas", "integer"),
    ("Desired", ".status.replicas", "integer"),
    ("Min", ".spec.minSize", "integer"),
    ("Max", ".spec.maxSize", "integer"),
    ("Restarts", ".status.restarts", "integer"),
    ("Age", ".metadata.creationTimestamp", "date"),
)
PADDING = 3  # kubectl's column gap


def lookup(obj: Any, path: str) -> Any:
    """The value at a simple JSONPath like ``.status.phase`` (None where any part is missing)."""
    for part in path.lstrip(".").split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _pair(big: int, big_unit: str, small: int, small_unit: str) -> str:
    return f"{big}{big_unit}" if small == 0 else f"{big}{big_unit}{small}{small_unit}"


def human_age(seconds: float) -> str:
    """A duration as kubectl's AGE column writes it (two units at most, coarser with age)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 120:
        return f"{max(s, 0)}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        return _pair(minutes, "m", s % 60, "s")
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return _pair(hours, "h", minutes % 60, "m")
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return _pair(days, "d", hours % 24, "h")
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        return _pair(days // 365, "y", days % 365, "d")
    return f"{days // 365}y"


def cell(obj: dict[str, Any], path: str, kind: str, now: datetime.datetime) -> str:
    """One cell as kubectl prints it (an absent value is an empty cell)."""
    value = lookup(obj, path)
    if value is None:
        return ""
    if kind == "date":
        return human_age(now.timestamp() - (parse_time(value) or 0.0))
    return str(value)


def render(jobs: Sequence[dict[str, Any]], all_namespaces: bool = False,
           now: datetime.datetime | None = None) -> str:
    """The table of ``jobs`` (TrainingJob objects with status), one line each, header first."""
    now = now or datetime.datetime.now(datetime.UTC)
    header = (["NAMESPACE"] if all_namespaces else []) + ["NAME"] + [h.upper() for h, _, _ in COLUMNS]
    rows = [header]
    for job in jobs:
        meta = job.get("metadata", {})
        lead = ([meta.get("namespace", "")] if all_namespaces else []) + [meta.get("name", "")]
        rows.append(lead + [cell(job, path, kind, now) for _, path, kind in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        padded = [v.ljust(w + PADDING) for v, w in zip(r[:-1], widths[:-1], strict=True)]
        lines.append("".join(padded) + r[-1])
    return "\n".join(lines)
