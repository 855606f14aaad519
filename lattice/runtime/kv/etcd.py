"""The ``etcd`` backend: :class:`KVStore` over etcd v3's gRPC-JSON gateway.

Plain HTTP (stdlib), no gRPC stack: every call is a ``POST`` with a JSON body
whose byte fields are base64 and whose 64-bit integers arrive as strings. CAS
is a ``/kv/txn`` with a ``MOD`` (or ``CREATE``=0) compare; sessions are leases
(``/lease/grant|keepalive|revoke``); ``wait`` is a streaming ``/watch`` that
starts at ``index + 1``, so changes made between a read and the wait are never
missed. The v2 API is not used.

The gateway prefix is chosen from ``GET /version``: etcd 3.4+ serves ``/v3``
(3.4 still rewrites ``/v3beta``), 3.3 serves ``/v3beta``, 3.2 ``/v3alpha``.
Indexes are etcd revisions (store-wide), so ``list`` reports the revision it
read at.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from typing import Any

from lattice.runtime.kv._http import Endpoint, HTTPResult, set_read_timeout
from lattice.runtime.kv.api import (
    CASConflict,
    KVEntry,
    KVError,
    KVStore,
    KVUnavailable,
    Listing,
    Session,
    SessionExpired,
    WaitResult,
    check_value,
    validate_key,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\x00"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _entry(kv: dict[str, Any]) -> KVEntry:
    lease = int(kv.get("lease") or 0)
    return KVEntry(
        key=base64.b64decode(kv["key"]).decode(),
        value=base64.b64decode(kv.get("value") or ""),
        mod_index=int(kv.get("mod_revision") or 0),
        create_index=int(kv.get("create_revision") or 0),
        session=str(lease) if lease else None,
    )


def _api_prefix(version: str) -> str:
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    major, minor = (parts + [0, 0])[:2]
    if (major, minor) >= (3, 4):
        return "/v3"
    return "/v3beta" if (major, minor) == (3, 3) else "/v3alpha"


class EtcdKV(KVStore):
    """A :class:`KVStore` on an etcd v3 cluster through its JSON gateway.

    Args:
        url: one client URL, e.g. ``http://127.0.0.1:2379``.
        timeout: seconds allowed for each non-streaming request.
        api_prefix: ``/v3``, ``/v3beta`` or ``/v3alpha``; detected when None.
    """

    def __init__(
        self, url: str = "http://127.0.0.1:2379", *, timeout: float = 10.0,
        api_prefix: str | None = None,
    ) -> None:
        self._ep = Endpoint(url)
        self.url = self._ep.url
        self._timeout = timeout
        self._prefix = api_prefix
        self._lock = threading.Lock()

    # ------------------------------------------------------------- plumbing
    @property
    def api_prefix(self) -> str:
        """The gateway prefix in use (asks the server once)."""
        with self._lock:
            if self._prefix is None:
                res = self._ep.request("GET", "/version", timeout=self._timeout)
                if res.status != 200:
                    raise KVError(f"GET {self.url}/version: HTTP {res.status}")
                self._prefix = _api_prefix(json.loads(res.body).get("etcdserver", "3.4"))
            return self._prefix

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        res = self._ep.request("POST", self.api_prefix + path, json.dumps(body).encode(),
                               {"Content-Type": "application/json"}, self._timeout)
        if res.status == 200:
            return json.loads(res.body)
        raise self._error(path, res)

    @staticmethod
    def _error(path: str, res: HTTPResult) -> KVError:
        try:
            message = json.loads(res.body).get("message") or res.body.decode()
        except (ValueError, AttributeError):
            message = res.body.decode(errors="replace")
        if "lease not found" in message:
            return SessionExpired(message)
        if res.status in (502, 503, 504):
            return KVUnavailable(f"{path}: HTTP {res.status}: {message}")
        return KVError(f"{path}: HTTP {res.status}: {message}")

    def _txn(self, compare: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
        out = self._post("/kv/txn", {"compare": [compare], "success": [op]})
        if not out.get("succeeded"):
            raise CASConflict(f"compare failed on key {base64.b64decode(compare['key']).decode()!r}")
        return out

    @staticmethod
    def _mod_compare(key: str, index: int) -> dict[str, Any]:
        if index == 0:
            return {"target": "CREATE", "result": "EQUAL", "key": _b64(key.encode()),
                    "create_revision": "0"}
        return {"target": "MOD", "result": "EQUAL", "key": _b64(key.encode()),
                "mod_revision": str(index)}

    @staticmethod
    def _put_req(key: str, value: bytes, session: str | None) -> dict[str, Any]:
        req: dict[str, Any] = {"key": _b64(key.encode()), "value": _b64(value)}
        if session is not None:
            req["lease"] = str(int(session))
        return req

    # ------------------------------------------------------------------- KV
    def get(self, key: str) -> KVEntry | None:
        out = self._post("/kv/range", {"key": _b64(validate_key(key).encode())})
        kvs = out.get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    def put(self, key: str, value: bytes, *, session: str | None = None) -> int:
        req = self._put_req(validate_key(key), check_value(value), session)
        return int(self._post("/kv/put", req)["header"]["revision"])

    def cas(self, key: str, value: bytes, index: int, *, session: str | None = None) -> int:
        req = self._put_req(validate_key(key), check_value(value), session)
        out = self._txn(self._mod_compare(key, index), {"request_put": req})
        return int(out["header"]["revision"])

    def delete(self, key: str, *, index: int | None = None) -> None:
        req = {"key": _b64(validate_key(key).encode())}
        if index is None:
            self._post("/kv/deleterange", req)
            return
        if index < 1:
            raise ValueError(f"delete index must be >= 1, got {index}")
        self._txn(self._mod_compare(key, index), {"request_delete_range": req})

    def _range(self, prefix: str) -> dict[str, Any]:
        raw = validate_key(prefix, prefix=True).encode() or b"\x00"
        return {"key": _b64(raw), "range_end": _b64(prefix_end(prefix.encode()))}

    def delete_prefix(self, prefix: str) -> None:
        self._post("/kv/deleterange", self._range(prefix))

    def list(self, prefix: str) -> Listing:
        body = {**self._range(prefix), "sort_order": "ASCEND", "sort_target": "KEY"}
        out = self._post("/kv/range", body)
        entries = [_entry(kv) for kv in out.get("kvs") or []]
        return Listing(entries, int(out["header"]["revision"]))

    def wait(self, prefix: str, index: int, timeout: float) -> WaitResult:
        create = {**self._range(prefix), "start_revision": str(max(int(index), 0) + 1)}
        body = json.dumps({"create_request": create}).encode()
        deadline = time.monotonic() + timeout
        conn, resp = self._ep.open_stream(self.api_prefix + "/watch", body,
                                          {"Content-Type": "application/json"}, self._timeout)
        try:
            if resp.status != 200:
                raise self._error("/watch", HTTPResult(resp.status, {}, resp.read()))
            return self._read_watch(conn, resp, index, deadline)
        finally:
            conn.close()

    def _read_watch(self, conn: Any, resp: Any, index: int, deadline: float) -> WaitResult:
        while (remaining := deadline - time.monotonic()) > 0:
            set_read_timeout(conn, remaining)
            try:
                line = resp.readline()
            except TimeoutError:
                break
            except OSError as exc:
                raise KVUnavailable(f"watch stream failed: {exc}") from exc
            if not line:
                raise KVUnavailable("watch stream closed by the server")
            if not line.strip():
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise KVError(f"watch failed: {msg['error'].get('message')}")
            result = msg.get("result") or {}
            if result.get("compact_revision") or result.get("canceled"):
                return WaitResult(True, int(result.get("header", {}).get("revision", index)))
            events = result.get("events") or []
            if events:
                return WaitResult(True, max(int(e["kv"]["mod_revision"]) for e in events))
        return WaitResult(False, index)

    # ------------------------------------------------------------- sessions
    def create_session(self, ttl: float, *, name: str = "lattice") -> Session:
        out = self._post("/lease/grant", {"TTL": str(max(1, math.ceil(ttl))), "ID": "0"})
        if out.get("error"):
            raise KVError(f"lease grant failed: {out['error']}")
        return Session(str(int(out["ID"])), float(out.get("TTL") or ttl))

    def renew_session(self, session_id: str) -> float:
        out = self._post("/lease/keepalive", {"ID": str(int(session_id))})
        if "error" in out:
            raise KVError(f"lease keepalive failed: {out['error']}")
        ttl = int((out.get("result") or {}).get("TTL") or 0)
        if ttl <= 0:
            raise SessionExpired(f"lease {session_id} does not exist")
        return float(ttl)

    def destroy_session(self, session_id: str) -> None:
        try:
            self._post("/lease/revoke", {"ID": str(int(session_id))})
        except SessionExpired:
            pass
