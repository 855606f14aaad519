"""Client of the Lattice checkpoint service (``lattice://host:port/<job>``), HTTP API v1 (docs/storage.md).

Every request carries ``Authorization: Bearer <token>``, the token from
``LATTICE_SERVICE_TOKEN`` or the file named by ``LATTICE_SERVICE_TOKEN_FILE``. Files stream in
8 MiB pieces both ways (never held whole in memory) with their crc32c in
``X-Lattice-Crc32c``; the service verifies it and commits a step atomically when its
manifest arrives after all its files. 5xx, 429 and connection failures raise
``TransientStoreError`` (``transfer`` retries those); 401/400/409/413 raise errors that say
what to fix.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

from ..errors import AlreadyCommittedError, CheckpointError, ConfigError, CorruptCheckpointError
from .base import Limited, Source, Store, byte_view, check_name, named
from .transfer import TransientStoreError

CHUNK = 8 << 20
TIMEOUT = float(os.environ.get("LATTICE_SERVICE_TIMEOUT", "120"))
_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def service_token() -> str:
    """The bearer token: ``LATTICE_SERVICE_TOKEN``, else the contents of ``LATTICE_SERVICE_TOKEN_FILE``."""
    token = os.environ.get("LATTICE_SERVICE_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("LATTICE_SERVICE_TOKEN_FILE", "").strip()
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"LATTICE_SERVICE_TOKEN_FILE={path!r} cannot be read: {exc.strerror or exc}") from None
        if token:
            return token
        raise ConfigError(f"LATTICE_SERVICE_TOKEN_FILE={path!r} is empty")
    raise ConfigError("a lattice:// checkpoint_dir needs the service's token: set LATTICE_SERVICE_TOKEN or "
                      "LATTICE_SERVICE_TOKEN_FILE (the file given to `lattice checkpoint-service serve --token-file`)")


class ServiceStore(Store):
    """Checkpoints of one job on a checkpoint service; commit is the service's atomic manifest PUT."""

    def __init__(self, url: str, token: str | None = None, timeout: float = TIMEOUT):
        parts = urlsplit(url)
        if parts.scheme.lower() != "lattice" or not parts.hostname:
            raise ConfigError(f"checkpoint_dir {url!r}: expected lattice://HOST:PORT/JOB")
        job = parts.path.strip("/") or os.environ.get("LATTICE_JOB", "")
        if not _JOB.match(job) or ".." in job:
            raise ConfigError(f"checkpoint_dir {url!r}: the job name {job!r} must match "
                              "[A-Za-z0-9][A-Za-z0-9._-]{0,127} without '..' (lattice://HOST:PORT/JOB)")
        self.url, self.job, self.timeout = url, job, timeout
        self.host, self.port = parts.hostname, parts.port or 80
        self.token = token or service_token()
        self._base = f"/v1/jobs/{quote(job)}/checkpoints"

    # -- HTTP ------------------------------------------------------------------------------
    def _send(self, method: str, path: str, body: bytes | memoryview | None = None,
              headers: dict[str, str] | None = None, stream_from: Path | None = None,
              size: int = 0) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.putrequest(method, path)
            hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
            hdrs["Content-Length"] = str(size if stream_from is not None else len(body or b""))
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.endheaders()
            # endheaders() has connected: conn.sock is set
            if stream_from is not None:
                with open(stream_from, "rb") as f:  # zero-copy from the page cache (sendfile where the OS has it)
                    conn.sock.sendfile(f, 0, size)
            elif body is not None and len(body):
                view = memoryview(body)
                for i in range(0, len(view), CHUNK):  # sendall's timeout covers one call: keep calls small
                    conn.sock.sendall(view[i:i + CHUNK])  # slices of a memoryview: no copy
            return conn, conn.getresponse()
        except (http.client.HTTPException, OSError) as exc:
            conn.close()
            if isinstance(exc, FileNotFoundError):
                raise
            raise TransientStoreError(f"{method} {self._where(path)} failed: {type(exc).__name__}: {exc}") from exc

    def _call(self, method: str, path: str, ok: tuple[int, ...], **kw: Any) -> bytes:
        conn, resp = self._send(method, path, **kw)
        try:
            data = resp.read()
        except (http.client.HTTPException, OSError) as exc:
            raise TransientStoreError(f"{method} {self._where(path)}: reading the answer failed: {exc}") from exc
        finally:
            conn.close()
        if resp.status not in ok:
            self._raise(method, path, resp.status, data)
        return data

    def _where(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def _raise(self, method: str, path: str, status: int, data: bytes) -> None:
        try:
            doc = json.loads(data)
            msg = doc.get("error", "") if isinstance(doc, dict) else str(doc)
        except ValueError:
            doc, msg = {}, data[:200].decode(errors="replace")
        where = f"{method} {self._where(path)}"
        if status == 401:
            raise ConfigError(f"{where}: the checkpoint service refused the token (401: {msg}); check "
                              "LATTICE_SERVICE_TOKEN / LATTICE_SERVICE_TOKEN_FILE")
        if status == 404:
            raise FileNotFoundError(f"{where}: not found ({msg})")
        if status == 413:
            raise CheckpointError(f"{where}: the file is larger than the service accepts (413: {msg}); start the "
                                  "service with a larger --max-file-size")
        if status == 409:
            extra = {k: doc.get(k) for k in ("missing", "mismatch") if isinstance(doc, dict) and doc.get(k)}
            kind = AlreadyCommittedError if isinstance(doc, dict) and doc.get("committed") else CheckpointError
            raise kind(f"{where}: conflict (409): {msg} {extra or ''}".rstrip())
        if status == 400 and "crc" in msg.lower():
            raise CorruptCheckpointError(where, None, f"the service saw another crc32c (400): {msg}")
        if status >= 500 or status == 429:
            raise TransientStoreError(f"{where}: the service answered {status}: {msg}")
        raise CheckpointError(f"{where}: the service refused the request ({status}): {msg}")

    # -- Store -----------------------------------------------------------------------------
    def list_committed(self) -> list[int]:
        """GET .../checkpoints: the service lists committed steps only. A job with none lists ``[]``."""
        try:
            doc = json.loads(self._call("GET", self._base, (200,)))
        except FileNotFoundError:
            return []
        return sorted((int(c["step"]) for c in doc.get("checkpoints", [])), reverse=True)

    def read_manifest(self, step: int) -> bytes:
        """GET .../{step}/manifest; ``FileNotFoundError`` (404) unless committed."""
        return self._call("GET", f"{self._base}/{step}/manifest", (200,))

    def put_file(self, step: int, name: str, source: Source, size: int, crc32c: int) -> None:
        """PUT .../{step}/files/{name}, streamed; the service checks the crc32c and discards a mismatch."""
        check_name(name)
        where: dict[str, Any]
        if isinstance(source, memoryview):
            view = byte_view(source)
            if len(view) != size:
                raise CorruptCheckpointError(named(source), None, f"is {len(view)} bytes, expected {size}")
            where = {"body": view}
        else:
            if not Path(source).is_file():
                raise FileNotFoundError(f"{source} does not exist")
            where = {"stream_from": Path(source), "size": size}
        self._call("PUT", f"{self._base}/{step}/files/{quote(name)}", (200, 201), **where,
                   headers={"X-Lattice-Crc32c": f"{crc32c:08x}", "Content-Type": "application/octet-stream"})

    def read_pending(self, step: int, name: str) -> bytes:
        """GET .../{step}/pending/{name}: a file put for the uncommitted step; ``FileNotFoundError`` (404) if none."""
        check_name(name)
        return self._call("GET", f"{self._base}/{step}/pending/{quote(name)}", (200,))

    def commit(self, step: int, manifest: bytes, keep: int | None = None) -> None:
        """PUT .../{step}/manifest; the service commits atomically or answers 409 naming the files.

        Retention runs here (list, then DELETE each dropped step) rather than through the
        service's ``?keep=K``, which keeps the newest K overall: Lattice keeps the newest K up
        to ``step`` and never deletes a newer timeline's checkpoints (nor the one just committed).
        """
        self._call("PUT", f"{self._base}/{step}/manifest", (200, 201), body=manifest,
                   headers={"Content-Type": "application/json"})
        if keep is not None:
            self.retain(keep, newest=step)

    def open_file(self, step: int, name: str) -> BinaryIO:
        """GET .../{step}/files/{name} as a stream; ``FileNotFoundError`` (404) unless committed and present."""
        return self._get_file(step, name, {}, (200,))

    def open_range(self, step: int, name: str, offset: int, length: int) -> BinaryIO:
        """GET .../{step}/files/{name} with ``Range``; a range past the end (416) is an empty stream."""
        if length <= 0:
            return io.BytesIO(b"")
        body = self._get_file(step, name, {"Range": f"bytes={offset}-{offset + length - 1}"}, (206, 200), past_end=True)
        if isinstance(body, _Body) and body.resp.status == 200:  # the Range was ignored (a proxy): skip to it
            body.skip(offset)
        return Limited(body, length)  # type: ignore[return-value]

    def _get_file(self, step: int, name: str, headers: dict[str, str], ok: tuple[int, ...],
                  past_end: bool = False) -> BinaryIO:
        check_name(name)
        path = f"{self._base}/{step}/files/{quote(name)}"
        conn, resp = self._send("GET", path, headers=headers)
        if resp.status not in ok:
            data = resp.read()
            conn.close()
            if past_end and resp.status == 416:  # the file is shorter than the range: nothing of it
                return io.BytesIO(b"")
            self._raise("GET", path, resp.status, data)
        return _Body(conn, resp, self._where(path))  # type: ignore[return-value]

    def delete(self, step: int) -> None:
        """DELETE .../{step}: the service removes the committed step (atomically) or a pending upload; 404 if neither."""
        self._call("DELETE", f"{self._base}/{step}", (200, 204))

    def cleanup(self) -> list[str]:
        """Nothing to do from the client: the service removes abandoned uploads itself when it starts."""
        return []


class _Body:
    """A streamed response body that closes its connection when closed; a cut-off body is transient."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, where: str):
        self.conn, self.resp, self.where = conn, resp, where

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.resp.read(n if n >= 0 else None)
        except (http.client.HTTPException, OSError) as exc:
            raise TransientStoreError(f"GET {self.where}: the body was cut off: {exc}") from exc
        if n != 0 and not data and self.resp.length:  # http.client returns b"" when the peer hangs up early
            raise TransientStoreError(f"GET {self.where}: the body was cut off {self.resp.length} bytes before its end")
        return data

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes (fewer if the body ends first)."""
        while n > 0 and (data := self.read(min(n, CHUNK))):
            n -= len(data)

    def close(self) -> None:
        self.resp.close()
        self.conn.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
