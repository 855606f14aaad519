"""Checkpoint options in one place, each with an environment override (``LATTICE_*``).

Values come from, in order of precedence: arguments to ``lattice.configure``, the
environment (the agent sets these for its workers), then the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

ON_BUSY = ("skip", "wait")


@dataclasses.dataclass(frozen=True)
class Config:
    """Checkpoint policy and location.

    Attributes:
        checkpoint_dir: where checkpoints go: a directory (created if missing) or a URL
            (``file://``, ``s3://``, ``gs://``, ``memory://``, any fsspec URL, or the checkpoint
            service ``lattice://host:port/job``); see docs/storage.md.
        every_steps: checkpoint every N ``lattice.step()`` calls; ``None`` or 0 turns it off.
        every_seconds: checkpoint when this many seconds passed since the last one; ``None`` off.
        keep: how many committed checkpoints to keep (older ones are deleted after a newer commit).
        on_busy: what a policy-triggered checkpoint does while the previous one still persists:
            ``"skip"`` (default, logged) or ``"wait"``. ``lattice.checkpoint()`` always waits.
        capture_rng: also checkpoint the global RNG states (Python, numpy, torch).
        restore: restore the newest good checkpoint at ``register`` (set False to start fresh).
        part_timeout: with several ranks, how long rank 0 waits for every rank's part of a
            checkpoint before giving that checkpoint up (seconds).
    """

    checkpoint_dir: str = "checkpoints"
    every_steps: int | None = 100
    every_seconds: float | None = None
    keep: int = 3
    on_busy: str = "skip"
    capture_rng: bool = True
    restore: bool = True
    part_timeout: float = 600.0

    def __post_init__(self) -> None:
        _check_int("every_steps", self.every_steps, allow_none=True, minimum=0)
        _check_int("keep", self.keep, allow_none=False, minimum=1)
        if self.every_seconds is not None:
            if isinstance(self.every_seconds, bool) or not isinstance(self.every_seconds, int | float):
                raise ConfigError(f"every_seconds must be a number of seconds or None, got {self.every_seconds!r}")
            if not self.every_seconds > 0:
                raise ConfigError(f"every_seconds must be > 0 (or None to turn it off), got {self.every_seconds!r}")
        if isinstance(self.part_timeout, bool) or not isinstance(self.part_timeout, int | float) or self.part_timeout <= 0:
            raise ConfigError(f"part_timeout must be a positive number of seconds, got {self.part_timeout!r}")
        if self.on_busy not in ON_BUSY:
            raise ConfigError(f"on_busy must be one of {ON_BUSY}, got {self.on_busy!r}")
        if not isinstance(self.checkpoint_dir, str | os.PathLike) or not str(self.checkpoint_dir):
            raise ConfigError(f"checkpoint_dir must be a non-empty path or URL, got {self.checkpoint_dir!r}")

    def replace(self, **changes: Any) -> Config:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(self))
            raise ConfigError(f"unknown option(s) {sorted(unknown)}; valid options: {names}")
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value: Any, *, allow_none: bool, minimum: int) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ConfigError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


_ENV = {
    "LATTICE_CHECKPOINT_DIR": ("checkpoint_dir", str),
    "LATTICE_EVERY_STEPS": ("every_steps", int),
    "LATTICE_EVERY_SECONDS": ("every_seconds", float),
    "LATTICE_KEEP": ("keep", int),
    "LATTICE_ON_BUSY": ("on_busy", str),
    "LATTICE_PART_TIMEOUT": ("part_timeout", float),
}


def from_env(environ: Mapping[str, str] | None = None, base: Config | None = None) -> Config:
    """Return ``base`` (default: the defaults) with the ``LATTICE_*`` variables applied."""
    environ = os.environ if environ is None else environ
    changes: dict[str, Any] = {}
    for var, (field, kind) in _ENV.items():
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        raw = raw.strip()
        if kind is not str and raw.lower() in ("none", "off", "0") and field in ("every_steps", "every_seconds"):
            changes[field] = None
            continue
        try:
            changes[field] = kind(raw)
        except ValueError:
            raise ConfigError(f"environment variable {var}={raw!r} is not a valid {kind.__name__}") from None
    try:
        return (base or Config()).replace(**changes)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from the LATTICE_* environment variables)") from None


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"1048576"``, ``"512M"``, ``"2GiB"``, ``"1.5G"`` -> bytes (binary units, case ignored);
    ``ValueError`` for anything else or a size that is not positive (callers name their flag)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 1048576, 512M, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
