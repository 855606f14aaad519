"""Agent options (the torchrun-compatible flags of ``lattice run`` / ``lattice agent``) and the
environment each worker gets."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid

from ...core.errors import ConfigError
from .spare import DEFAULT_PRELOAD


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:3"`` -> (1, 3); clear errors for anything else."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        raise ConfigError(f"--nnodes {text!r}: expected N or MIN:MAX with integers, e.g. 1:3") from None
    if len(parts) not in (1, 2) or lo < 1 or hi < lo:
        raise ConfigError(f"--nnodes {text!r}: need 1 <= MIN <= MAX (e.g. 1:3), got min {lo}, max {hi}")
    return lo, hi


@dataclasses.dataclass
class AgentConfig:
    command: list[str]
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    max_restarts: int = 3
    backend: str = "embedded"
    endpoint: str | None = None
    job: str = "default"
    checkpoint_dir: str = "checkpoints"
    node: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
    addr: str = "127.0.0.1"
    last_call: float = 2.0
    join_timeout: float = 600.0
    ttl: float = 10.0
    grace: float = 30.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"  # 0.0.0.0 in a pod, so the operator can read it
    spec_generation: int = 0  # LATTICE_SPEC_GENERATION: newer min/max published by any agent win
    min_session_ttl: float = 10.0
    spares: bool = True  # restart workers in warm spare processes (single-agent jobs; see spare.py)
    preload: tuple[str, ...] = DEFAULT_PRELOAD  # modules a spare imports while it waits
    auto: bool = False  # transparent mode: the command runs the script under `python -m lattice.auto`
    memory_tier: str = "auto"  # checkpoints in /dev/shm, persisted by the agent (memtier.py): auto | on | off
    memory_root: str = "/dev/shm"
    memory_limit: int | None = None  # bytes the memory tier may use (None: what the root has free)
    upload_timeout: float = 300.0  # seconds a stopping agent waits for its last checkpoint to be stored

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("no training script given: lattice run [options] script.py [args]")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise ConfigError(f"--nnodes: need 1 <= MIN <= MAX, got {self.min_nodes}:{self.max_nodes}")
        if not self.job or not all(c.isalnum() or c in "-_." for c in self.job):
            raise ConfigError(f"--rdzv-id {self.job!r}: use letters, digits, '-', '_' and '.'")

    def endpoint_url(self) -> str | None:
        if self.endpoint is None:
            return None
        return self.endpoint if "://" in self.endpoint else f"http://{self.endpoint}"


def worker_envs(cfg: AgentConfig, group_rank: int, world: int, master: tuple[str, int],
                round_: int, restarts: int) -> list[dict[str, str]]:
    """The torchrun-compatible environment (plus ``LATTICE_*``) of each local worker."""
    n = cfg.nproc_per_node
    envs = []
    for local in range(n):
        envs.append({
            "RANK": str(group_rank * n + local), "LOCAL_RANK": str(local),
            "WORLD_SIZE": str(world * n), "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": str(group_rank),
            "GROUP_WORLD_SIZE": str(world), "ROLE_RANK": str(group_rank * n + local), "ROLE_WORLD_SIZE": str(world * n),
            "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]),
            "TORCHELASTIC_RESTART_COUNT": str(restarts), "TORCHELASTIC_MAX_RESTARTS": str(cfg.max_restarts),
            "TORCHELASTIC_RUN_ID": cfg.job,
            "LATTICE_JOB": cfg.job, "LATTICE_ROUND": str(round_), "LATTICE_NODE": cfg.node,
            "LATTICE_CHECKPOINT_DIR": cfg.checkpoint_dir,
        })
    return envs
