"""``lattice checkpoint-service serve``: run the checkpoint service until SIGTERM or SIGINT.

:func:`add_cli` registers the command on the ``lattice`` parser; :func:`serve` is the
asyncio entry point (also usable in-process). On a signal the service stops accepting
connections, lets requests in flight finish (up to ``--shutdown-timeout``), deletes the
uploads that never got their manifest, releases the root and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lattice.core import config
from lattice.core.errors import ConfigError

log = logging.getLogger("lattice")
READ_BUFSIZE = 1 << 20  # socket reads buffered per connection before back-pressure


def parse_size(text: str) -> int:
    """``"1048576"``, ``"512M"``, ``"10G"`` or ``"1T"`` (binary units) -> bytes, for argparse."""
    try:
        return config.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed); warns if anyone can read it."""
    try:
        token = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"--token-file {str(path)!r} cannot be read: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {str(path)!r} is empty; put a long random token in it "
                          "(e.g. `openssl rand -hex 32 > FILE`)")
    if mode & stat.S_IROTH:  # group-readable is normal for a Kubernetes Secret (mode 0440, fsGroup)
        log.warning("token file %s is readable by every user; chmod o-r it", path)
    return token


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``checkpoint-service serve`` on the ``lattice`` parser; return ``checkpoint-service``."""
    top = subparsers.add_parser("checkpoint-service", help="HTTP service storing checkpoints per job")
    sub = top.add_subparsers(dest="service_command", required=True)
    p = sub.add_parser("serve", help="serve checkpoints stored under --root",
                       description="Serve the Lattice checkpoint service (see docs/service.md).")
    p.add_argument("--root", type=Path, required=True,
                   help="directory holding one checkpoint root per job (a local disk or a PersistentVolume)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8470, help="port to bind; 0 picks a free one (default 8470)")
    p.add_argument("--token-file", type=Path, required=True,
                   help="file holding the bearer token every client must send")
    p.add_argument("--max-file-size", type=parse_size, default=64 << 30,
                   help="largest accepted file in bytes (suffixes K, M, G, T; default 64G); larger -> 413")
    p.add_argument("--abandon-after", type=float, default=86400.0,
                   help="seconds an upload may wait for its next file or manifest before it is "
                        "deleted (default 86400)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight may take to finish after SIGTERM (default 30)")
    p.set_defaults(fn=cmd_serve)
    return top


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service with the parsed options until a signal; return the exit status."""
    from .server import ServiceConfig

    logging.getLogger("lattice").setLevel(logging.INFO)  # commits are logged at INFO
    config = ServiceConfig(root=args.root, token=read_token(args.token_file),
                           max_file_size=args.max_file_size, abandon_after=args.abandon_after)
    asyncio.run(serve(config, args.host, args.port, shutdown_timeout=args.shutdown_timeout))
    return 0


async def serve(config: Any, host: str, port: int, *, shutdown_timeout: float = 30.0,
                ready: Callable[[str], None] | None = None) -> None:
    """Open the root, serve until SIGTERM/SIGINT, then shut down gracefully.

    Args:
        config: a :class:`~lattice.runtime.service.server.ServiceConfig`.
        host: address to bind.
        port: port to bind (0: a free one).
        shutdown_timeout: how long requests in flight may take after the signal.
        ready: called with the service URL once it listens (default: print it).
    """
    from aiohttp import web

    from .layout import ServiceRoot
    from .server import create_app

    root = ServiceRoot(config.root)
    for path in root.open():
        log.info("removed leftover %s (an upload that never committed)", path)
    app = create_app(config, root)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=shutdown_timeout,
                           read_bufsize=READ_BUFSIZE)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}"
        (ready or (lambda u: print(f"lattice checkpoint-service listening on {u}", flush=True)))(url)
        log.info("checkpoint service on %s serving %s", url, root.path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("checkpoint service: signal received, finishing requests in flight")
        await runner.cleanup()
    finally:
        for pending in app["service"].pending.values():
            shutil.rmtree(pending.dir, ignore_errors=True)
        root.close()
    log.info("checkpoint service stopped (pid %d)", os.getpid())
