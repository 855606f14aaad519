"""``lattice run`` and ``lattice agent``: torchrun-compatible flags for the elastic agent."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ...core.errors import ConfigError
from . import memtier
from .config import AgentConfig, parse_nnodes
from .spare import DEFAULT_PRELOAD

BACKENDS = ("embedded", "consul", "etcd")


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nnodes", default="1", help="N or MIN:MAX agents (nodes) in the job (default 1)")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, help="workers per agent")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=3,
                   help="worker failures the whole job may restart from (shared by all agents)")
    p.add_argument("--rdzv-backend", "--rdzv_backend", default="embedded", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default=None, help="HOST:PORT of the KV store")
    p.add_argument("--rdzv-id", "--rdzv_id", default="default", help="the job's name in the KV store")
    p.add_argument("--checkpoint-dir", default=None, help="default: $LATTICE_CHECKPOINT_DIR or ./checkpoints")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-addr", default="127.0.0.1",
                   help="address the metrics server binds (default 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument("--node-addr", default="127.0.0.1", help="address peers use to reach this node's rank 0")
    p.add_argument("--last-call", type=float, default=2.0, help="seconds a round waits for more nodes after MIN")
    p.add_argument("--grace", type=float, default=30.0, help="seconds workers get to checkpoint and exit on a planned stop")
    p.add_argument("--ttl", type=float, default=10.0, help="rendezvous session TTL in seconds")
    p.add_argument("-m", dest="module", action="store_true", help="run the script argument as a module (python -m)")
    p.add_argument("--no-python", action="store_true", help="run the script directly, not with the Python interpreter")
    p.add_argument("--no-spares", action="store_true",
                   help="restart workers as fresh processes (default, in single-agent jobs: in a warm spare that has imported torch)")
    p.add_argument("--spare-preload", default=",".join(DEFAULT_PRELOAD),
                   help=f"comma-separated modules each spare imports while it waits (default {','.join(DEFAULT_PRELOAD)})")
    p.add_argument("--auto", action="store_true",
                   help="transparent mode: run an unmodified PyTorch script under `python -m lattice.auto`, "
                        "which checkpoints and resumes it (docs/transparent.md); LATTICE_AUTO=0 turns it off")
    memtier.add_flags(p)
    p.add_argument("script", help="the training script (or module with -m)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")


def config_from_args(args: argparse.Namespace, require_endpoint: bool = False) -> AgentConfig:
    if args.rdzv_backend not in BACKENDS:
        raise ConfigError(f"--rdzv-backend {args.rdzv_backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if args.rdzv_backend != "embedded" and not args.rdzv_endpoint:
        raise ConfigError(f"--rdzv-backend {args.rdzv_backend} needs --rdzv-endpoint HOST:PORT")
    if require_endpoint and not args.rdzv_endpoint:
        raise ConfigError("lattice agent needs --rdzv-endpoint HOST:PORT (start one with `lattice rendezvous serve`)")
    lo, hi = parse_nnodes(args.nnodes)
    auto = getattr(args, "auto", False)
    if auto and args.no_python:
        raise ConfigError("--auto runs the script with Python (python -m lattice.auto); it cannot be used with --no-python")
    runner = ["-m", "lattice.auto"] if auto else []
    if args.module:
        command = [sys.executable, "-u", *runner, "-m", args.script, *args.args]
    elif args.no_python:
        command = [args.script, *args.args]
    else:
        command = [sys.executable, "-u", *runner, args.script, *args.args]
    ckpt = args.checkpoint_dir or os.environ.get("LATTICE_CHECKPOINT_DIR", "checkpoints")
    ckpt = ckpt if "://" in ckpt else os.path.abspath(ckpt)  # a URL (s3://, lattice://) stays as given
    return AgentConfig(command=command, min_nodes=lo, max_nodes=hi, nproc_per_node=args.nproc_per_node,
                       max_restarts=args.max_restarts, backend=args.rdzv_backend, endpoint=args.rdzv_endpoint,
                       job=args.rdzv_id, checkpoint_dir=ckpt, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                       spec_generation=_generation(),
                       addr=args.node_addr, last_call=args.last_call, grace=args.grace, ttl=args.ttl,
                       spares=not args.no_spares, auto=auto,
                       preload=tuple(m.strip() for m in args.spare_preload.split(",") if m.strip()),
                       **memtier.options(args))


def _check_reachable(cfg: AgentConfig) -> None:
    from ..kv.api import KVUnavailable
    from ..kv.registry import create_backend

    if cfg.endpoint is None:
        return
    try:
        store = create_backend(cfg.backend, url=cfg.endpoint_url())
        store.get(f"lattice/{cfg.job}/state")
        store.close()
    except KVUnavailable as exc:
        raise ConfigError(f"--rdzv-endpoint {cfg.endpoint}: cannot reach the {cfg.backend} store ({exc})") from None


def cmd_run(args: argparse.Namespace, require_endpoint: bool = False) -> int:
    from .agent import main

    cfg = config_from_args(args, require_endpoint)
    _check_reachable(cfg)
    return main(cfg)


def add_cli(sub: Any) -> None:
    run = sub.add_parser("run", help="run a training script under the elastic agent (torchrun-compatible)")
    _add_flags(run)
    run.set_defaults(fn=cmd_run)
    agent = sub.add_parser("agent", help="one node's agent of a multi-node job (needs --rdzv-endpoint)")
    _add_flags(agent)
    agent.set_defaults(fn=lambda a: cmd_run(a, require_endpoint=True))


def _generation() -> int:
    """``LATTICE_SPEC_GENERATION`` (set by the operator): agents of a newer TrainingJob spec
    publish their ``--nnodes`` limits to the job's other agents."""
    raw = os.environ.get("LATTICE_SPEC_GENERATION", "0")
    try:
        return max(0, int(raw))
    except ValueError:
        raise ConfigError(f"LATTICE_SPEC_GENERATION={raw!r} is not an integer") from None
