"""Validation of the names a client puts in a checkpoint-service URL: job, step and file.

Every name becomes a path component under ``--root``, so each is checked against a strict
pattern before any path is built: no separators, no ``.``/``..``, no leading dot (hidden
names are the service's own uploads in progress), no absolute paths. A bad name raises
:class:`NameError_` whose message says which name is wrong and why (the server answers 400).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from lattice.core import fmt

JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
STEP_RE = re.compile(r"[0-9]{1,10}")
MAX_STEP = 9_999_999_999


class NameError_(ValueError):  # noqa: N801 - avoid shadowing the builtin NameError
    """A job, step or file name that the service refuses (answered with 400)."""


def _why_bad(kind: str, value: str, max_len: int) -> str:
    """Say in words why ``value`` does not match the pattern for ``kind``."""
    if value == "":
        return f"{kind} name is empty"
    if value in (".", ".."):
        return f"{kind} name {value!r} is a path traversal"
    if "/" in value or "\\" in value:
        return f"{kind} name {value!r} contains a path separator (absolute or nested paths are not allowed)"
    if value.startswith("."):
        return f"{kind} name {value!r} starts with '.' (hidden names are reserved for the service)"
    if len(value) > max_len:
        return f"{kind} name is {len(value)} characters long; at most {max_len} are allowed"
    return (f"{kind} name {value!r} has characters outside [A-Za-z0-9._-] or does not start "
            "with a letter or digit")


def check_job(job: str) -> str:
    """Return ``job`` if it is a valid job name, else raise :class:`NameError_`."""
    if not JOB_RE.fullmatch(job):
        raise NameError_(_why_bad("job", job, 128))
    if ".." in job:
        raise NameError_(f"job name {job!r} contains '..'")
    return job


def check_file(name: str, *, allow_manifest: bool = False) -> str:
    """Return ``name`` if it is a valid checkpoint file name, else raise :class:`NameError_`.

    ``manifest.json`` is refused unless ``allow_manifest``: it is the commit marker and only
    arrives through the manifest route.
    """
    if not FILE_RE.fullmatch(name):
        raise NameError_(_why_bad("file", name, 255))
    if name == fmt.MANIFEST and not allow_manifest:
        raise NameError_(f"file name {name!r} is reserved: send the manifest to .../manifest, last")
    return name


def check_step(step: str) -> int:
    """Return the step number of the decimal string ``step`` (0..9999999999), else raise."""
    if not STEP_RE.fullmatch(step):
        raise NameError_(f"step {step!r} is not a decimal integer between 0 and {MAX_STEP}")
    return int(step)


def check_path_segments(raw_path: str) -> None:
    """Refuse a raw (still percent-encoded) URL path with empty, ``.`` or ``..`` segments.

    Caught before routing, so ``/v1/jobs/%2e%2e/...`` gets a 400 naming the problem rather
    than being normalised into another route.
    """
    path = raw_path.split("?", 1)[0]
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        text = unquote(seg)
        if text in (".", ".."):
            raise NameError_(f"path segment {seg!r} is a path traversal")
        if text == "" and i < len(segments) - 1:
            raise NameError_(f"URL path {path!r} has an empty segment (absolute names are not allowed)")
        if "\x00" in text:
            raise NameError_(f"path segment {seg!r} contains a NUL byte")
