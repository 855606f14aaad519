"""Where a worker commits, uploads and restores from, for a checkpoint_dir that may be a URL.

Three shapes (docs/storage.md):

- a plain path (or ``file://``): commit straight into it, as always (``store`` is ``None``);
- a remote URL: commit into a local *staging* directory with the usual Persister, then a
  background thread uploads each commit (``transfer.upload``: files first, manifest last) and
  applies retention on the store; ``lattice.wait()`` covers the upload;
- ``LATTICE_MEMORY_DIR`` set (by the agent, the memory tier): commit into that directory and
  upload nothing; the agent persists it. Restore prefers memory on equal steps.

Restore takes candidates from every tier, newest first; a remote one is downloaded into the
staging directory (under a lock, so ranks on one host download it once) and then restored
like a local checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

import crc32c as _crc

from .. import fmt
from ..errors import CheckpointError
from ..ranks import Ranks
from ..storage import LocalDirectory
from . import is_remote, open_store
from .base import Store
from .file import path_of

log = logging.getLogger("lattice")
SHM = Path("/dev/shm")
SHM_MIN_FREE = 2 << 30  # staging goes to /dev/shm only if it has this much free
DISABLED = "DISABLED"  # contract B: its existence in the memory dir turns the memory tier off
TIER_ORDER = {"memory": 0, "staging": 1, "local": 2, "store": 3}  # preference on equal steps
VERIFIED = ".verified-"  # <memory dir>/.verified-<step>: the agent checked every byte of that checkpoint


@dataclasses.dataclass
class Location:
    """Where this process commits (``local``), what it uploads to (``store`` if ``upload``) and reads from."""

    url: str
    local: Path
    kind: str  # "local" | "staging" | "memory"
    store: Store | None = None
    staging: Path | None = None  # where remote checkpoints are downloaded to
    memory: Path | None = None  # a memory dir the agent disabled: still read at restore, never written
    assemble: bool = False  # ranks on several hosts: each rank puts its part, rank 0 commits in the store

    @property
    def upload(self) -> bool:
        """Whether committed local checkpoints are uploaded afterwards (one host, a URL)."""
        return self.kind == "staging" and not self.assemble


@dataclasses.dataclass
class Candidate:
    """One checkpoint restore may use: a committed local directory or a committed step in the store."""

    step: int
    tier: str
    path: Path | None = None


def _manifest_digest(ckpt: Path) -> str:
    return f"{_crc.crc32c((ckpt / fmt.MANIFEST).read_bytes()):08x}"


def mark_verified(memory_dir: Path, step: int, checked: Path) -> None:
    """Record that every file of memory checkpoint ``step`` matched its manifest's size and crc32c.

    ``checked`` holds the files that were checked (the agent's hard links to them, which every
    backend's upload checks file by file). A restore from memory then need not checksum the same
    bytes again: they have stayed in this node's memory since, and checkpoint files are never
    rewritten in place. The marker names the checked manifest's own checksum, so another
    checkpoint committed later under the same step is not covered by it.
    """
    marker = memory_dir / f"{VERIFIED}{step}"
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(_manifest_digest(checked))
    os.replace(tmp, marker)


def verified(cand: Candidate) -> bool:
    """Whether ``cand`` is a memory checkpoint the agent marked as checked (``mark_verified``)."""
    if cand.tier != "memory" or cand.path is None:
        return False
    try:
        return (cand.path.parent / f"{VERIFIED}{cand.step}").read_text() == _manifest_digest(cand.path)
    except OSError:
        return False


def drop_stale_marks(memory_dir: Path) -> None:
    """Remove the markers of checkpoints no longer in ``memory_dir``."""
    for entry in os.scandir(memory_dir):
        if entry.name.startswith(VERIFIED) and entry.name[len(VERIFIED):].isdigit():
            step = int(entry.name[len(VERIFIED):])
            if not (memory_dir / fmt.step_dirname(step)).exists():
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def resolve(checkpoint_dir: str, ranks: Ranks, environ: Mapping[str, str] | None = None) -> Location:
    """Decide the shape from ``checkpoint_dir``, ``LATTICE_MEMORY_DIR`` and ``LATTICE_STAGING_DIR``."""
    env = os.environ if environ is None else environ
    url = str(checkpoint_dir)
    memory = env.get("LATTICE_MEMORY_DIR", "").strip()
    multi_node = _multi_node(ranks, env)
    if memory and multi_node:
        log.warning("LATTICE_MEMORY_DIR is ignored: with ranks on several hosts each agent's memory directory "
                    "holds only its own ranks' parts, so rank 0 could never commit; using %s directly", url)
        memory = ""
    disabled = bool(memory) and memory_disabled(Path(memory))
    if disabled:
        log.warning("the agent turned the memory tier off (%s exists): checkpoints go to %s",
                    Path(memory) / DISABLED, url)
    old_memory = Path(memory) if disabled else None  # still read at restore, never written
    memory = "" if disabled else memory
    if not is_remote(url):
        local = path_of(url)
        if multi_node and ranks.rank == 0:
            _warn_if_host_local(local, ranks)
        if old_memory is not None:
            return Location(url, local, "local", memory=old_memory)
        if memory:
            from .file import FileStore

            return Location(url, Path(memory), "memory", FileStore(str(local)), None)
        return Location(url, local, "local")
    store = open_store(url)
    explicit = env.get("LATTICE_STAGING_DIR", "").strip()
    staging = Path(explicit) if explicit else default_staging(url)
    if multi_node:  # no directory is shared between hosts: assemble the checkpoint in the store
        return Location(url, staging, "staging", store, staging, old_memory, assemble=True)
    if memory:
        return Location(url, Path(memory), "memory", store, staging)
    return Location(url, staging, "staging", store, staging, old_memory)


HOST_LOCAL_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "ramfs", "overlay"}


def fs_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point in /proc/mounts), or "?"."""
    real, best, kind = os.path.realpath(path), "", "?"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, kind = mnt, fields[2]
    return kind


def _same_machine(addr: str) -> bool:
    """Whether the rank-0 address ``addr`` (``MASTER_ADDR``) is this machine (local agents, tests)."""
    if addr in ("", "localhost", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _warn_if_host_local(local: Path, ranks: Ranks) -> None:
    """Ranks on several hosts assemble a checkpoint in one directory: say so if it cannot be shared."""
    if _same_machine(os.environ.get("MASTER_ADDR", "")):
        return  # several agents, one machine: the directory is shared
    kind = fs_type(local.parent if not local.exists() else local)
    if kind in HOST_LOCAL_FS:
        log.warning("checkpoint_dir %s is on a %s filesystem of this host, but the %d ranks run on several hosts: "
                    "unless every host mounts this same directory, rank 0 never sees the other hosts' parts and "
                    "no checkpoint commits. Use a URL (lattice://, s3://, ...) or a shared mount", local, kind,
                    ranks.world)


def memory_disabled(memory: Path) -> bool:
    """Whether the agent (or a worker out of room) turned the memory tier off: ``<memory>/DISABLED`` exists."""
    return (memory / DISABLED).exists()


def memory_room(memory: Path) -> int:
    """Bytes a worker can still write into the memory dir (its filesystem's free space)."""
    st = os.statvfs(memory)
    return st.f_bavail * st.f_frsize


def disable_memory(memory: Path, size: int, room: int, why: str) -> None:
    """A worker turns the memory tier off itself (contract B): it could not write ``size`` bytes.

    Writes the ``DISABLED`` record the agent reads (it logs how to make room); best effort:
    on a full filesystem even this small file may not fit, and the worker switches anyway.
    """
    doc = {"by": "worker", "size": size, "room": room, "pid": os.getpid(), "message": why}
    tmp = memory / f".{DISABLED}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, memory / DISABLED)
    except OSError as exc:
        log.warning("could not record the switch to the storage tier in %s: %s", memory, exc)
        tmp.unlink(missing_ok=True)


def _multi_node(ranks: Ranks, env: Mapping[str, str]) -> bool:
    if ranks.world <= 1:
        return False
    try:
        local = int(env.get("LOCAL_WORLD_SIZE", "0"))
    except ValueError:
        local = 0
    if local <= 0:
        log.warning("WORLD_SIZE=%d but LOCAL_WORLD_SIZE is not set: assuming every rank runs on this host",
                    ranks.world)
        return False
    return local < ranks.world


def default_staging(url: str) -> Path:
    """``/dev/shm/lattice-staging-<uid>/<hash of url>`` if /dev/shm has 2 GiB free, else the same under the temp dir."""
    name = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = Path(tempfile.gettempdir())
    try:
        st = os.statvfs(SHM)
        if os.access(SHM, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= SHM_MIN_FREE:
            base = SHM
    except OSError:
        pass
    return base / f"lattice-staging-{os.getuid()}" / name


def candidates(loc: Location, *, tolerate_store_errors: bool = False) -> list[Candidate]:
    """Every committed checkpoint this location can restore, newest first; on equal steps memory first."""
    out = [Candidate(s, loc.kind, p) for s, p in LocalDirectory(loc.local).committed()]
    if loc.memory is not None:
        out += [Candidate(s, "memory", p) for s, p in LocalDirectory(loc.memory).committed()]
    if loc.staging is not None and loc.staging != loc.local:
        out += [Candidate(s, "staging", p) for s, p in LocalDirectory(loc.staging).committed()]
    if loc.store is not None and loc.store.local_root is not None:
        out += [Candidate(s, "local", p) for s, p in LocalDirectory(loc.store.local_root).committed()]
    elif loc.store is not None:
        try:
            out += [Candidate(s, "store") for s in loc.store.list_committed()]
        except Exception as exc:
            if not tolerate_store_errors:
                raise CheckpointError(f"cannot list the checkpoints in {loc.url}: {type(exc).__name__}: {exc}") from exc
            log.warning("cannot list the checkpoints in %s (%s); restoring from memory only", loc.url, exc)
    return sorted(out, key=lambda c: (-c.step, TIER_ORDER[c.tier]))


def fetch(loc: Location, cand: Candidate) -> Path:
    """The local directory of ``cand``: as is for local ones, downloaded into staging for store ones.

    Downloads hold an exclusive lock on the staging directory, so ranks sharing it fetch a step
    once. Raises ``FileNotFoundError`` if the step left the store, ``CorruptCheckpointError`` if it
    is damaged there.
    """
    if cand.path is not None:
        return cand.path
    assert loc.store is not None and loc.staging is not None
    LocalDirectory(loc.staging).prepare()
    with open(loc.staging / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            log.info("downloading step %d from %s into %s", cand.step, loc.url, loc.staging)
            return loc.store.download(cand.step, loc.staging)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
