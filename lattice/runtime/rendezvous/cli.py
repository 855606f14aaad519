"""``lattice rendezvous serve``: run the embedded rendezvous store from the command line.

:func:`add_cli` registers the subcommand on the ``lattice`` parser; the command
itself is :func:`lattice.runtime.kv.server.main` (same options, same exit codes).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rendezvous serve`` on ``subparsers`` (from ``add_subparsers``); return ``rendezvous``."""
    from lattice.runtime.kv.server import build_parser

    rdzv = subparsers.add_parser("rendezvous", help="rendezvous store for elastic jobs")
    sub = rdzv.add_subparsers(dest="rendezvous", required=True)
    serve = sub.add_parser(
        "serve", parents=[build_parser()], add_help=False,
        help="serve the embedded Consul-compatible KV store",
        description="Serve the embedded Consul-compatible KV store for rendezvous.",
    )
    serve.set_defaults(fn=cmd_serve, func=cmd_serve)
    return rdzv


def cmd_serve(args: argparse.Namespace) -> int:
    """Run :func:`lattice.runtime.kv.server.main` with the parsed options."""
    from lattice.runtime.kv.server import main

    argv = ["--host", args.host, "--port", str(args.port),
            "--min-session-ttl", str(args.min_session_ttl)]
    if args.token_file is not None:
        argv += ["--token-file", str(args.token_file)]
    return main(argv)
