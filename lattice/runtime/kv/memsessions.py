"""Session records of the embedded server and the parsing of ``/v1/session/create``.

Kept apart from :mod:`memstore` because the request rules (case-insensitive
field names, Go durations, Consul's TTL and lock-delay ranges) are a separate
concern from how invalidation releases or deletes keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lattice.runtime.kv.durations import format_duration, parse_duration, parse_lock_delay

MAX_TTL = 86400.0
MAX_LOCK_DELAY = 60.0
DEFAULT_LOCK_DELAY = 15.0
DEFAULT_NODE = "lattice-embedded"


class SessionRequestError(ValueError):
    """A session create request is malformed (the server answers 400)."""


@dataclass(frozen=True)
class SessionRec:
    """A session as the embedded server stores it (durations in seconds)."""

    id: str = ""
    name: str = ""
    node: str = DEFAULT_NODE
    behavior: str = "release"
    ttl: float | None = None
    lock_delay: float = DEFAULT_LOCK_DELAY
    node_checks: list[str] = field(default_factory=list)
    service_checks: list[Any] = field(default_factory=list)
    create_index: int = 0
    modify_index: int = 0
    expires: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Render as Consul's session object."""
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": int(round(self.lock_delay * 1e9)),
            "Behavior": self.behavior,
            "TTL": format_duration(self.ttl) if self.ttl else "",
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": list(self.service_checks),
            "Checks": list(self.node_checks),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def parse_session_request(body: dict[str, Any], *, min_ttl: float) -> SessionRec:
    """Build a :class:`SessionRec` from a create request body.

    Field names match case-insensitively, as Consul's decoder does.

    Raises:
        SessionRequestError: naming the offending field.
    """
    fields = {str(k).lower(): v for k, v in body.items()}
    behavior = str(fields.get("behavior") or "release")
    if behavior not in ("release", "delete"):
        raise SessionRequestError(f"Invalid Behavior setting '{behavior}'")
    checks = fields.get("nodechecks", fields.get("checks"))
    return SessionRec(
        name=str(fields.get("name") or ""),
        node=str(fields.get("node") or DEFAULT_NODE),
        behavior=behavior,
        ttl=_parse_ttl(fields.get("ttl"), min_ttl),
        lock_delay=_parse_delay(fields.get("lockdelay")),
        node_checks=["serfHealth"] if checks is None else [str(c) for c in checks],
        service_checks=list(fields.get("servicechecks") or []),
    )


def _parse_ttl(value: Any, min_ttl: float) -> float | None:
    if value in (None, ""):
        return None
    try:
        ttl = parse_duration(str(value))
    except ValueError as exc:
        raise SessionRequestError(f"Request decode failed: {exc}") from None
    if ttl == 0:
        return None
    if not min_ttl <= ttl <= MAX_TTL:
        raise SessionRequestError(
            f"Invalid Session TTL '{value}', must be between "
            f"[{format_duration(min_ttl)}={format_duration(MAX_TTL)}]"
        )
    return ttl


def _parse_delay(value: Any) -> float:
    if value is None:
        return DEFAULT_LOCK_DELAY
    try:
        delay = parse_lock_delay(value)
    except ValueError as exc:
        raise SessionRequestError(f"Request decode failed: {exc}") from None
    if not 0 <= delay <= MAX_LOCK_DELAY:
        raise SessionRequestError(f"Invalid LockDelay '{value}', must be between 0s and 60s")
    return delay
