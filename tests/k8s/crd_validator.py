"""Offline stand-in for the API server's create-time checks of a custom resource.

No API server runs here, so this module applies a CRD's ``openAPIV3Schema`` the way the
apiextensions server does, in the same order: prune nulls and apply defaults, check the
schema (translated to JSON Schema draft 4, which has the same keyword meanings, with strict
field validation so unknown fields are errors as with ``kubectl apply``), check
``x-kubernetes-list-type: map`` keys, then run the ``x-kubernetes-validations`` CEL rules
with a real CEL evaluator (cel-python), skipped when a blocking schema error exists, as the
server does. Messages follow the server's ``<path>: <kind>: <detail>`` shape. An
``x-kubernetes-*`` keyword this module does not implement raises instead of being ignored.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any

import celpy
import jsonschema

# Keywords whose meaning in a structural schema equals JSON Schema draft 4.
_PLAIN_KEYWORDS = {
    "type", "properties", "items", "required", "enum", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "pattern", "multipleOf", "uniqueItems", "allOf",
    "anyOf", "oneOf", "not", "additionalProperties", "description", "default", "format",
    "title", "example", "nullable",
}
# Handled here rather than by jsonschema.
_K8S_KEYWORDS = {
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}
# The server skips CEL rules when one of these schema errors is present (hasBlockingErr).
_BLOCKING = {"required", "type", "enum", "maxLength", "maxItems", "maxProperties"}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def to_jsonschema(node: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Translate one structural-schema node (and its children) to JSON Schema draft 4."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") and key not in _K8S_KEYWORDS:
            raise NotImplementedError(f"{path or '<root>'}: {key} is not implemented by this validator")
        if key not in _PLAIN_KEYWORDS and key not in _K8S_KEYWORDS:
            raise NotImplementedError(f"{path or '<root>'}: schema keyword {key!r} is not implemented")
        if key in _K8S_KEYWORDS or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub, f"{path}.{name}") for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_jsonschema(value, f"{path}[*]" if key == "items" else path)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_jsonschema(sub, path) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    is_object = node.get("type") == "object"
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if is_object and not preserve and "additionalProperties" not in node and path != ".metadata":
        out["additionalProperties"] = False  # strict field validation: unknown fields are errors
    return out


@dataclass
class FieldError:
    """One validation failure, as the API server would report it."""

    path: str
    detail: str
    blocking: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.detail}" if self.path else self.detail


@dataclass
class CRDValidator:
    """Validates custom resources of one CRD version against that version's schema and rules."""

    crd: dict[str, Any]
    version: str = "v1"
    schema: dict[str, Any] = field(init=False)
    _validator: jsonschema.Draft4Validator = field(init=False)
    _cel: celpy.Environment = field(init=False)

    def __post_init__(self) -> None:
        versions = {v["name"]: v for v in self.crd["spec"]["versions"]}
        if self.version not in versions:
            raise KeyError(f"CRD has no version {self.version!r}; it has {sorted(versions)}")
        self.schema = versions[self.version]["schema"]["openAPIV3Schema"]
        self._validator = jsonschema.Draft4Validator(to_jsonschema(self.schema),
                                                     format_checker=_FORMATS)
        self._cel = celpy.Environment()

    # ----- public -----
    def prepare(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of ``obj`` with null fields pruned and schema defaults applied."""
        out = copy.deepcopy(obj)
        _default(self.schema, out)
        return out

    def validate(self, obj: dict[str, Any]) -> list[FieldError]:
        """All errors the API server would report for creating ``obj`` (empty when accepted)."""
        obj = self.prepare(obj)
        errors = self._identity_errors(obj)
        errors += [_translate(e) for e in self._validator.iter_errors(obj)]
        errors += _list_map_errors(self.schema, obj, "")
        if any(e.blocking for e in errors):
            errors.append(FieldError("", "Invalid value: some validation rules were not "
                                     "checked because the object was invalid; correct the "
                                     "existing errors to complete validation"))
        else:
            errors += self._cel_errors(self.schema, obj, "")
        return errors

    def compile_rules(self) -> list[str]:
        """Compile every CEL rule in the schema; returns the rules (raises on a bad one)."""
        rules = [r["rule"] for _, r in _rules(self.schema, "")]
        for rule in rules:
            self._cel.compile(rule)
        return rules

    # ----- pieces -----
    def _identity_errors(self, obj: dict[str, Any]) -> list[FieldError]:
        spec = self.crd["spec"]
        errors = []
        want_api = f"{spec['group']}/{self.version}"
        if obj.get("apiVersion") != want_api:
            errors.append(FieldError("apiVersion", f"Invalid value: {obj.get('apiVersion')!r}: "
                                     f"must be {want_api}"))
        if obj.get("kind") != spec["names"]["kind"]:
            errors.append(FieldError("kind", f"Invalid value: {obj.get('kind')!r}: "
                                     f"must be {spec['names']['kind']}"))
        name = (obj.get("metadata") or {}).get("name")
        if not isinstance(name, str) or not name:
            errors.append(FieldError("metadata.name", "Required value: name is required",
                                     blocking=True))
        elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            errors.append(FieldError("metadata.name", f"Invalid value: {name!r}: a lowercase "
                                     "RFC 1123 subdomain must consist of lower case "
                                     "alphanumeric characters, '-' or '.'"))
        return errors

    def _cel_errors(self, schema: dict[str, Any], value: Any, path: str) -> list[FieldError]:
        errors = []
        for rule_path, rule in _rules_at(schema, value, path):
            node_value = rule["value"]
            program = self._cel.program(self._cel.compile(rule["rule"]))
            try:
                result = program.evaluate({"self": celpy.json_to_cel(node_value)})
            except celpy.CELEvalError as exc:
                errors.append(FieldError(rule_path, f"Invalid value: \"object\": rule "
                                         f"{rule['rule']!r} failed to evaluate: {exc}"))
                continue
            if isinstance(result, celpy.CELEvalError):
                errors.append(FieldError(rule_path, f"Invalid value: \"object\": rule "
                                         f"{rule['rule']!r} failed to evaluate: {result}"))
            elif not bool(result):
                where = rule_path + (rule.get("fieldPath") or "")
                message = rule.get("message") or f"failed rule: {rule['rule']}"
                errors.append(FieldError(where.lstrip("."), f"Invalid value: \"object\": {message}"))
        return errors


# ----- helpers (module level, each small) -----
_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    """RFC 3339 date-time, as the API server's ``format: date-time`` check demands."""
    if isinstance(value, str):
        if not re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", value):
            raise ValueError(value)
        datetime.datetime.fromisoformat(value.replace("z", "Z"))
    return True


def _default(schema: dict[str, Any], value: Any) -> None:
    """Prune nulls of non-nullable fields and apply defaults, in place (apiextensions order)."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in list(value):
            sub = props.get(name) or (schema.get("additionalProperties")
                                      if isinstance(schema.get("additionalProperties"), dict)
                                      else None)
            if value[name] is None and sub is not None and not sub.get("nullable"):
                del value[name]
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def _k8s_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else json.dumps(value, default=str)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]


def _translate(err: jsonschema.ValidationError) -> FieldError:
    """Turn a jsonschema error into the API server's message for the same failure."""
    path = _k8s_path(err.absolute_path)
    kind, want, got = err.validator, err.validator_value, err.instance
    blocking = kind in _BLOCKING
    if kind == "required":
        missing = re.match(r"^'(.+)' is a required property$", err.message)
        name = missing.group(1) if missing else err.message
        return FieldError(f"{path}.{name}".lstrip("."), "Required value", blocking)
    if kind == "additionalProperties":
        extra = sorted(set(got) - set(err.schema.get("properties", {})))
        names = [f"{path}.{e}" if path else e for e in extra]
        return FieldError("", ", ".join(f'unknown field "{n}"' for n in names), blocking)
    body = f"{path} in body"
    detail = {
        "type": lambda: f"Invalid value: \"{_json_type(got)}\": {body} must be of type {want}: "
                        f"\"{_json_type(got)}\"",
        "enum": lambda: f"Unsupported value: {_show(got)}: supported values: "
                        + ", ".join(_show(w) for w in want),
        "minimum": lambda: f"Invalid value: {_show(got)}: {body} should be greater than "
                           + ("" if err.schema.get("exclusiveMinimum") else "or equal to ")
                           + _show(want),
        "maximum": lambda: f"Invalid value: {_show(got)}: {body} should be less than "
                           + ("" if err.schema.get("exclusiveMaximum") else "or equal to ")
                           + _show(want),
        "minLength": lambda: f"Invalid value: {_show(got)}: {body} should be at least "
                             f"{want} chars long",
        "minItems": lambda: f"Invalid value: {len(got)}: {body} should have at least {want} items",
        "format": lambda: f"Invalid value: {_show(got)}: {body} must be of type {want}: {_show(got)}",
    }.get(kind, lambda: f"Invalid value: {_show(got)}: {err.message}")()
    return FieldError(path, detail, blocking)


def _rules(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every (schema path, rule) pair in the schema, for compiling."""
    found = [(path, r) for r in schema.get("x-kubernetes-validations", [])]
    for name, sub in schema.get("properties", {}).items():
        found += _rules(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += _rules(schema[key], f"{path}[*]")
    return found


def _rules_at(schema: dict[str, Any], value: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """The rules that apply to ``value`` and its present children, each with its value bound."""
    if value is None:
        return []
    found = [(path, {**r, "value": value}) for r in schema.get("x-kubernetes-validations", [])]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, child in value.items():
            sub = props.get(name) or (extra if isinstance(extra, dict) else None)
            if sub is not None:
                found += _rules_at(sub, child, f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            found += _rules_at(schema["items"], child, f"{path}[{i}]")
    return found


def _list_map_errors(schema: dict[str, Any], value: Any, path: str) -> list[FieldError]:
    """Duplicate keys in ``x-kubernetes-list-type: map`` lists."""
    errors: list[FieldError] = []
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += _list_map_errors(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list):
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for i, item in enumerate(value):
            if schema.get("x-kubernetes-list-type") == "map" and isinstance(item, dict):
                key = json.dumps({k: item.get(k) for k in keys}, sort_keys=True)
                if key in seen:
                    errors.append(FieldError(f"{path}[{i}]".lstrip("."), f"Duplicate value: {key}"))
                seen.add(key)
            if isinstance(schema.get("items"), dict):
                errors += _list_map_errors(schema["items"], item, f"{path}[{i}]")
    return errors
