"""The embedded rendezvous server: an in-memory store behind Consul's HTTP API.

Single-machine jobs (and the tests) need a rendezvous store without installing
Consul or etcd. This module serves :class:`~lattice.runtime.kv.consul_app.ConsulApp`
over HTTP/1.1 with the standard library's ``ThreadingHTTPServer`` (one thread
per connection, so blocking queries do not hold up other clients), so any
Consul client, including Lattice's own ``consul`` backend and py-consul, can
talk to it.

Deviations from Consul, on purpose: state is in memory only (one node, always
leader); sessions have no health checks (``Checks`` are recorded, never
evaluated); ``min_session_ttl`` may be set below Consul's 10s for tests;
``dc``/``ns``/``stale``/``consistent`` are accepted and ignored.

Use :func:`start_server` in-process, or :func:`main` from the command line
(``lattice rendezvous serve --host 127.0.0.1 --port 8500 [--token-file F]``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from lattice.runtime.kv.consul_app import MAX_VALUE_SIZE, ConsulApp, Request, Response
from lattice.runtime.kv.memstore import MemStore

MAX_BODY = 8 * 1024 * 1024
"""Bodies up to this size are read (then refused with 413 if too large); larger
ones are refused without reading and the connection is closed."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lattice-kv"
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._send(Response(413, f"Request body exceeds {MAX_VALUE_SIZE} bytes".encode()))
            return
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        req = Request(
            method=self.command,
            path=unquote(parts.path),
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self._send(self.server.app.handle(req))

    def _send(self, resp: Response) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("X-Consul-Index", str(resp.index or 1))
        self.send_header("X-Consul-KnownLeader", "true")
        self.send_header("X-Consul-LastContact", "0")
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(resp.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # many agents connect at once; the default backlog (5) resets them

    def __init__(self, addr: tuple[str, int], app: ConsulApp) -> None:
        self.app = app
        super().__init__(addr, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client went away (an agent exited): normal
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class ServerHandle:
    """A running embedded server.

    Attributes:
        host: the bound address.
        port: the bound port (the real one when 0 was requested).
        url: ``http://host:port``.
        store: the in-memory state (for tests and diagnostics).
    """

    def __init__(self, httpd: _Server, store: MemStore) -> None:
        self._httpd = httpd
        self.store = store
        self.host, self.port = httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = self._serve_thread(httpd)
        self._stopped = False

    @staticmethod
    def _serve_thread(httpd: _Server) -> threading.Thread:
        return threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="kv-server", daemon=True
        )

    def start(self) -> ServerHandle:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake blocked queries and stop the session reaper (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.store.close()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def restart(self, *, reset_session_timers: bool = True) -> ServerHandle:
        """Serve again on the same host and port with the same data (stopping first if needed).

        Simulates a store outage in tests. Like a Consul leader change, the
        restart resets every session's TTL timer unless ``reset_session_timers``
        is False, in which case sessions not renewed during the outage lapse.
        """
        self.stop()
        self.store.resume(reset_session_timers=reset_session_timers)
        self._httpd = _Server((self.host, self.port), self._httpd.app)
        self._thread = self._serve_thread(self._httpd)
        self._stopped = False
        self.store.start_reaper()
        return self.start()

    def wait(self) -> None:
        """Block until :meth:`stop` is called from another thread or a signal."""
        self._thread.join()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    *,
    min_session_ttl: float = 10.0,
) -> ServerHandle:
    """Start the embedded Consul-compatible server in background threads.

    Args:
        host: address to bind (loopback by default).
        port: port to bind; 0 picks a free one (see ``handle.port``).
        token: ACL token every request must carry; None disables ACLs.
        min_session_ttl: shortest session TTL accepted (Consul: 10 s).

    Returns:
        A :class:`ServerHandle`; call ``.stop()`` when done.
    """
    store = MemStore(min_session_ttl=min_session_ttl)
    httpd = _Server((host, port), ConsulApp(store, token=token))
    store.start_reaper()
    return ServerHandle(httpd, store).start()


def build_parser() -> argparse.ArgumentParser:
    """The ``rendezvous serve`` command-line options."""
    p = argparse.ArgumentParser(
        prog="lattice rendezvous serve",
        description="Serve the embedded Consul-compatible KV store for rendezvous.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8500, help="port to bind; 0 picks one (default 8500)")
    p.add_argument("--token-file", type=Path, help="file holding the ACL token clients must send")
    p.add_argument(
        "--min-session-ttl", type=float, default=10.0,
        help="shortest session TTL in seconds (Consul: 10; lower it for tests)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; print the URL once listening."""
    args = build_parser().parse_args(argv)
    token = None
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
        if not token:
            print(f"error: token file {args.token_file} is empty", file=sys.stderr)
            return 2
    handle = start_server(args.host, args.port, token, min_session_ttl=args.min_session_ttl)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"lattice rendezvous listening on {handle.url}", flush=True)
    stop.wait()
    handle.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
