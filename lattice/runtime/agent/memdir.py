"""The memory tier's settings and directory helpers: modes, sizes and their messages, the
``--memory-*`` flags, and the lock, owner and ``DISABLED`` files of a memory directory.

Split from ``memtier.py`` (the tier itself and its replicator), which re-exports these names.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from ...core import config
from ...core.errors import ConfigError
from ...core.stores.tiers import DISABLED  # the worker side reads the same name (contracts.md B)

log = logging.getLogger("lattice.agent")

MODES = ("auto", "on", "off")
LOCK = ".agent.lock"  # flock held by the owning agent for its whole life; also says whose dir it is
STAGE = ".upload-"  # hard links to a checkpoint being uploaded (survive the worker's retention)
SLOTS = 2  # checkpoints the tier must hold at once: the newest one kept + the next being written
POLL = 0.2  # seconds between looks at the memory dir
FULL = 1 << 20  # less room than this while a checkpoint is being written: it did not fit


def parse_size(text: str | None) -> int | None:
    """``"512M"``, ``"2G"``, ``"2GiB"``, ``"1048576"`` -> bytes (binary units); ``None``/``""`` -> None."""
    if text is None or str(text).strip() == "":
        return None
    try:
        return config.parse_size(text)
    except ValueError:
        raise ConfigError(f"--memory-limit {text!r}: expected a size such as 512M, 2G or 1073741824") from None


def human(n: float) -> str:
    """Bytes in binary units, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def add_flags(p: argparse.ArgumentParser) -> None:
    """The memory-tier options of ``lattice run`` / ``lattice agent`` (defaults from the environment)."""
    env = os.environ.get
    p.add_argument("--memory-tier", choices=MODES, default=env("LATTICE_MEMORY_TIER", "auto"),
                   help="checkpoint into shared memory (/dev/shm) and persist in the background: auto "
                        "(default; on for single-node jobs when the memory root exists and has room), on, "
                        "off. Falls back to the storage tier when /dev/shm is too small (docs/memory-tier.md)")
    p.add_argument("--memory-root", default=env("LATTICE_MEMORY_ROOT", "/dev/shm"),
                   help="where the memory tier's directory goes (default /dev/shm; $LATTICE_MEMORY_ROOT)")
    p.add_argument("--memory-limit", default=env("LATTICE_MEMORY_LIMIT"),
                   help="most memory the tier may use, e.g. 8G (default: what the memory root has free)")
    p.add_argument("--upload-timeout", type=float, default=300.0,
                   help="seconds a stopping agent waits for its last checkpoint to reach storage (default 300)")


def options(args: argparse.Namespace) -> dict[str, Any]:
    """``AgentConfig`` fields from the parsed memory-tier flags."""
    return {"memory_tier": args.memory_tier, "memory_root": args.memory_root,
            "memory_limit": parse_size(args.memory_limit), "upload_timeout": args.upload_timeout}


def too_small_message(root: Path, size: int, room: int, at_least: bool = False) -> str:
    """The error for a memory root that cannot hold ``SLOTS`` checkpoints of ``size`` bytes."""
    need = SLOTS * size
    step = 64 << 20  # advise a quarter to spare, in 64 MiB steps (whole GiB from 1 GiB up)
    advice = -(-int(need * 1.25) // step) * step
    if advice >= 1 << 30:
        advice = -(-advice // (1 << 30)) << 30
    docker, k8s = (f"{advice >> 30}g", f"{advice >> 30}Gi") if advice >= 1 << 30 else (f"{advice >> 20}m", f"{advice >> 20}Mi")
    return (f"{root} is too small for the memory tier: a checkpoint of this job is {'at least ' if at_least else ''}"
            f"{human(size)} and the tier needs room for {SLOTS} ({human(need)}), but it can use only "
            f"{human(room)}. Raise it: `docker run --shm-size={docker} ...`; in Kubernetes mount an emptyDir "
            f"with `medium: Memory` and `sizeLimit: {k8s}` at /dev/shm; or pass --memory-limit / "
            "--memory-tier off. Falling back to the storage tier: workers now write checkpoints straight to storage")


def resolve_mode(cfg: Any) -> str:
    """``"on"`` or ``"off"`` for this agent; ConfigError where ``on`` cannot work."""
    mode = getattr(cfg, "memory_tier", "auto")
    if mode not in MODES:
        raise ConfigError(f"--memory-tier {mode!r}: use one of {', '.join(MODES)}")
    if mode == "off":
        return "off"
    if cfg.max_nodes > 1:
        if mode == "on":
            raise ConfigError("--memory-tier on needs a single-agent job (--nnodes 1): ranks of several agents "
                              "cannot commit one checkpoint in node-local memory; use auto or off")
        log.info("memory tier off: it needs a single-agent job (--nnodes %d:%d)", cfg.min_nodes, cfg.max_nodes)
        return "off"
    root = Path(getattr(cfg, "memory_root", "/dev/shm"))
    if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
        if mode == "on":
            raise ConfigError(f"--memory-root {root}: not a writable directory; mount one (docs/memory-tier.md) "
                              "or use --memory-tier auto/off")
        log.info("memory tier off: %s is not a writable directory", root)
        return "off"
    return "on"


def _files(path: Path) -> list[os.DirEntry[str]]:
    return [e for e in os.scandir(path) if e.is_file(follow_symlinks=False)]


def dir_size(path: Path) -> int:
    """Apparent size of the files of one checkpoint directory (0 if it vanished)."""
    try:
        return sum(e.stat(follow_symlinks=False).st_size for e in _files(path))
    except FileNotFoundError:
        return 0


def usage(path: Path) -> int:
    """Memory the tree under ``path`` occupies (allocated blocks; files hard-linked twice count once)."""
    seen: set[int] = set()
    total = 0
    for top, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def _lock(path: Path, info: dict[str, Any]) -> int | None:
    """Take the owner lock of a memory dir (non-blocking); the open fd, or None if it is held."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if info:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _read_disabled(path: Path) -> dict[str, Any] | None:
    """The ``DISABLED`` record in a memory dir (``{}`` if it is not JSON), or None if there is none."""
    try:
        raw = (path / DISABLED).read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _owner(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}
