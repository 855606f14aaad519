"""A minimal HTTP client shared by the Consul and etcd backends (stdlib only).

One fresh ``http.client`` connection per call keeps the backends thread-safe
without a pool; connection failures and timeouts become
:class:`~lattice.runtime.kv.api.KVUnavailable`, so callers see one error type
for "the store is not there". :func:`open_stream` leaves the response open for
etcd's streaming watch.
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from lattice.runtime.kv.api import KVUnavailable


@dataclass(frozen=True)
class HTTPResult:
    """Status, lower-cased headers and body of a finished request."""

    status: int
    headers: dict[str, str]
    body: bytes


class Endpoint:
    """A base URL (``http://host:port``) to send requests to."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint {url!r} must look like http://host:port")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.url = f"{self.scheme}://{self.host}:{self.port}"

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> HTTPResult:
        """Send one request and read the whole response.

        Raises:
            KVUnavailable: when the server cannot be reached or does not answer
                within ``timeout`` seconds.
        """
        conn = self._connect(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return HTTPResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        except (OSError, http.client.HTTPException) as exc:
            raise KVUnavailable(f"{method} {self.url}{path.split('?')[0]}: {exc}") from exc
        finally:
            conn.close()

    def open_stream(
        self, path: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST ``body`` and return the open connection and response (caller closes)."""
        conn = self._connect(timeout)
        try:
            conn.request("POST", path, body=body, headers=headers)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise KVUnavailable(f"POST {self.url}{path}: {exc}") from exc


def set_read_timeout(conn: http.client.HTTPConnection, timeout: float) -> None:
    """Change the socket timeout of an open connection (for streaming reads)."""
    sock = conn.sock
    if isinstance(sock, socket.socket):
        sock.settimeout(max(timeout, 0.001))
