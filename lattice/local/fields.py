"""Unknown fields in a TrainingJob, refused as ``kubectl apply`` refuses them (strict validation).

``parse_job`` reads the fields it knows and ignores the rest; on a cluster the API server
rejects a misspelt field (``spec.minsize``) against the CRD's schema. ``KNOWN`` is that schema's
tree of declared properties (a test compares it with ``deploy/crd/trainingjobs.yaml``); ``None``
marks an object whose content is free (``x-kubernetes-preserve-unknown-fields`` or ``metadata``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.errors import ConfigError

_FREE = None
KNOWN: dict[str, Any] = {
    "apiVersion": {}, "kind": {}, "metadata": _FREE, "status": _FREE,
    "spec": {
        "minSize": {}, "maxSize": {}, "replicas": {}, "maxRestarts": {}, "nprocPerNode": {},
        "checkpoint": {"url": {}, "everySteps": {}, "everySeconds": {}, "keep": {}},
        "rendezvous": {"backend": {}, "endpoint": {}},
        "replicaSpecs": {"template": {"metadata": _FREE, "spec": _FREE}},
    },
}


def unknown_fields(obj: Mapping[str, Any], known: Mapping[str, Any] | None = None, path: str = "") -> list[str]:
    """The dotted paths of fields in ``obj`` that the CRD's schema does not declare."""
    known = KNOWN if known is None else known
    found = []
    for key, value in obj.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            found.append(where)
        elif known[key] and isinstance(value, Mapping):
            found += unknown_fields(value, known[key], where)
    return found


def check_fields(obj: Mapping[str, Any]) -> None:
    """ConfigError naming every unknown field (with the known ones next to it)."""
    bad = unknown_fields(obj)
    if bad:
        hints = []
        for where in bad:
            parent = where.rsplit(".", 1)[0] if "." in where else ""
            siblings = KNOWN
            for part in parent.split(".") if parent else ():
                siblings = siblings[part]
            hints.append(f'unknown field "{where}" (known: {", ".join(siblings)})')
        raise ConfigError("; ".join(hints) + " - a cluster rejects it too; fix the spelling")
