"""Helpers shared by the KV tests (imported by name: tests/runtime is on sys.path)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from lattice.runtime.kv import KVStore


def in_ci() -> bool:
    """True when the CI environment variable is set to something truthy."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class KVCase:
    """A backend under test, a session TTL short enough for tests, and how long
    to keep renewing to prove renewals work (longer than the backend's grace)."""

    name: str
    kv: KVStore
    ttl: float
    renew_window: float
