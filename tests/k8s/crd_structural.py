"""Checks the API server makes on a CRD itself that a JSON schema of the CRD object cannot:
the schema is structural, defaults are valid, list-map keys are required scalars, CEL rules
carry messages, and the scale subresource and printer columns point at declared fields of
the right type. Each check returns readable problems; an empty list means the CRD passes.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from crd_validator import to_jsonschema

_SCALARS = {"string", "integer", "number", "boolean"}
_ROOT_FIELDS = {"apiVersion", "kind", "metadata", "spec", "status"}


def resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    """The schema node a simple ``.a.b.c`` path names, or None when it is not declared."""
    node: dict[str, Any] | None = schema
    for part in json_path.strip(".").split("."):
        if node is None:
            return None
        node = node.get("properties", {}).get(part)
    return node


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found += _walk(node[key], f"{path}[*]")
    return found


def _node_problems(path: str, node: dict[str, Any]) -> list[str]:
    problems = []
    where = path or "<root>"
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if "type" not in node and not free:
        problems.append(f"{where}: not structural, no type")
    if node.get("type") == "array" and not isinstance(node.get("items"), dict):
        problems.append(f"{where}: array without an items schema")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
    for name in node.get("required", []):
        if name not in node.get("properties", {}) and not free:
            problems.append(f"{where}: required field {name!r} is not declared")
    if "default" in node:
        errors = list(jsonschema.Draft4Validator(to_jsonschema(node, path)).iter_errors(node["default"]))
        problems += [f"{where}: default {node['default']!r} is invalid: {e.message}" for e in errors]
    if node.get("x-kubernetes-list-type") == "map":
        items = node.get("items", {})
        keys = node.get("x-kubernetes-list-map-keys") or []
        if not keys:
            problems.append(f"{where}: list-type map needs x-kubernetes-list-map-keys")
        for key in keys:
            key_node = items.get("properties", {}).get(key, {})
            if key_node.get("type") not in _SCALARS:
                problems.append(f"{where}: map key {key!r} must be a declared scalar")
            if key not in items.get("required", []) and "default" not in key_node:
                problems.append(f"{where}: map key {key!r} must be required or defaulted")
    for rule in node.get("x-kubernetes-validations", []):
        if not rule.get("rule") or not rule.get("message"):
            problems.append(f"{where}: every CEL rule needs a rule and a message")
        if rule.get("fieldPath") and resolve(node, rule["fieldPath"]) is None:
            problems.append(f"{where}: fieldPath {rule['fieldPath']} is not a declared field")
    return problems


def schema_problems(schema: dict[str, Any]) -> list[str]:
    """Structural-schema problems of one version's ``openAPIV3Schema``."""
    problems = [p for path, node in _walk(schema, "") for p in _node_problems(path, node)]
    extra = set(schema.get("properties", {})) - _ROOT_FIELDS
    if extra:
        problems.append(f"<root>: only {sorted(_ROOT_FIELDS)} may be declared, not {sorted(extra)}")
    meta = schema.get("properties", {}).get("metadata", {})
    if set(meta) - {"type", "properties"} or set(meta.get("properties", {})) - {"name", "generateName"}:
        problems.append("<root>.metadata: may only restrict name and generateName")
    return problems


def _typed(schema: dict[str, Any], path: str, want: set[str], what: str) -> list[str]:
    node = resolve(schema, path)
    if node is None:
        return [f"{what} {path} is not declared in the schema"]
    if node.get("type") not in want:
        return [f"{what} {path} has type {node.get('type')!r}, expected one of {sorted(want)}"]
    return []


def version_problems(version: dict[str, Any]) -> list[str]:
    """Problems of one CRD version: its schema, scale subresource and printer columns."""
    schema = version["schema"]["openAPIV3Schema"]
    problems = schema_problems(schema)
    scale = version.get("subresources", {}).get("scale")
    if scale:
        spec_path, status_path = scale["specReplicasPath"], scale["statusReplicasPath"]
        if not spec_path.startswith(".spec."):
            problems.append(f"specReplicasPath {spec_path} must be under .spec")
        if not status_path.startswith(".status."):
            problems.append(f"statusReplicasPath {status_path} must be under .status")
        problems += _typed(schema, spec_path, {"integer"}, "specReplicasPath")
        problems += _typed(schema, status_path, {"integer"}, "statusReplicasPath")
        if "labelSelectorPath" in scale:
            problems += _typed(schema, scale["labelSelectorPath"], {"string"}, "labelSelectorPath")
    for col in version.get("additionalPrinterColumns", []):
        if col["jsonPath"] == ".metadata.creationTimestamp":
            if col["type"] != "date":
                problems.append(f"column {col['name']}: creationTimestamp is a date")
            continue
        want = {"date": {"string"}}.get(col["type"], {col["type"]})
        problems += _typed(schema, col["jsonPath"], want, f"column {col['name']}")
    return problems
