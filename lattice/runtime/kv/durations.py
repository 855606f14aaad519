"""Go-style duration strings (``"10s"``, ``"1m30s"``, ``"250ms"``), as Consul uses them.

Consul's HTTP API takes and returns durations in Go's ``time.Duration`` text
form (``wait=5s``, session ``TTL``) and lock delays as integer nanoseconds;
both the embedded server and the Consul client convert through here.
"""

from __future__ import annotations

import re

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go duration string into seconds.

    ``"0"`` is accepted; any other number needs a unit.

    Raises:
        ValueError: when ``text`` is not a valid duration.
    """
    text = text.strip()
    if text in ("0", ""):
        if text == "":
            raise ValueError("empty duration")
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    pos, total = 0, 0.0
    for match in _PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(body) or pos == 0:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Format seconds as a Go duration string Consul accepts (``"1.5s"``, ``"10s"``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def parse_lock_delay(value: object) -> float:
    """Parse a session ``LockDelay`` into seconds.

    Consul accepts a duration string or a number; numbers below 1000 are read
    as seconds and larger ones as nanoseconds.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid lock delay {value!r}")
    if isinstance(value, int | float):
        return float(value) if value < 1000 else float(value) * 1e-9
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"invalid lock delay {value!r}")
