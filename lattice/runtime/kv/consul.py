"""The ``consul`` and ``embedded`` backends: :class:`KVStore` over Consul's HTTP API.

Plain HTTP (stdlib), so it needs no third-party client and works the same
against a real Consul agent and the embedded server. Writes go through
``/v1/txn`` because that is the only Consul call that reports the new
``ModifyIndex`` of a write atomically (a plain ``PUT`` only answers ``true``),
and the index is the CAS/fencing token. ``wait`` is a Consul blocking query.

Sessions are created with ``Behavior=delete`` (bound keys vanish with the
session, like etcd leases), ``LockDelay=0s`` (a lapsed member may rejoin at
once) and no health checks (pure TTL sessions, renewed by the caller).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import quote, urlencode

from lattice.runtime.kv._http import Endpoint, HTTPResult
from lattice.runtime.kv.api import (
    CASConflict,
    KVEntry,
    KVError,
    KVStore,
    KVUnavailable,
    Listing,
    PermissionDenied,
    Session,
    SessionExpired,
    ValueTooLarge,
    WaitResult,
    check_value,
    validate_key,
)
from lattice.runtime.kv.durations import format_duration, parse_duration

_JITTER = 17 / 16  # Consul may add up to wait/16 to a blocking query


def _entry(data: dict[str, Any]) -> KVEntry:
    raw = data.get("Value")
    return KVEntry(
        key=data["Key"],
        value=base64.b64decode(raw) if raw else b"",
        mod_index=int(data["ModifyIndex"]),
        create_index=int(data.get("CreateIndex") or 0),
        session=data.get("Session") or None,
    )


def _kv_op(verb: str, key: str, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"Verb": verb, "Key": key}
    if "value" in extra:
        op["Value"] = base64.b64encode(extra.pop("value")).decode()
    op.update({k.capitalize(): v for k, v in extra.items() if v is not None})
    return {"KV": op}


class ConsulKV(KVStore):
    """A :class:`KVStore` speaking Consul's HTTP API.

    Args:
        url: the agent or server, e.g. ``http://127.0.0.1:8500``.
        token: ACL token sent as ``X-Consul-Token``.
        timeout: seconds allowed for each non-blocking request.
        owned_server: an embedded server handle to stop on :meth:`close`.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8500",
        *,
        token: str | None = None,
        timeout: float = 10.0,
        owned_server: Any = None,
    ) -> None:
        self._ep = Endpoint(url)
        self.url = self._ep.url
        self._token = token
        self._timeout = timeout
        self._server = owned_server

    # ------------------------------------------------------------- plumbing
    def _call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> HTTPResult:
        headers = {"X-Consul-Token": self._token} if self._token else {}
        if query:
            path = f"{path}?{urlencode(query)}"
        res = self._ep.request(method, path, body, headers, timeout or self._timeout)
        if res.status == 403:
            raise PermissionDenied(f"{method} {path}: {res.body.decode(errors='replace')}")
        if res.status == 413:
            raise ValueTooLarge(res.body.decode(errors="replace"))
        if res.status in (502, 503, 504):
            raise KVUnavailable(f"{method} {path}: HTTP {res.status}")
        return res

    @staticmethod
    def _fail(res: HTTPResult, what: str) -> KVError:
        return KVError(f"{what}: HTTP {res.status}: {res.body.decode(errors='replace')}")

    def _txn(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        res = self._call("PUT", "/v1/txn", body=json.dumps(ops).encode())
        if res.status == 409:
            errors = json.loads(res.body).get("Errors") or []
            what = "; ".join(str(e.get("What")) for e in errors)
            if "invalid session" in what.lower():
                raise SessionExpired(what)
            raise CASConflict(what)
        if res.status != 200:
            raise self._fail(res, "transaction")
        return [r["KV"] for r in json.loads(res.body).get("Results") or []]

    @staticmethod
    def _path(key: str) -> str:
        return "/v1/kv/" + quote(key, safe="/")

    # ------------------------------------------------------------------- KV
    def get(self, key: str) -> KVEntry | None:
        res = self._call("GET", self._path(validate_key(key)))
        if res.status == 404:
            return None
        if res.status != 200:
            raise self._fail(res, f"get {key}")
        return _entry(json.loads(res.body)[0])

    def put(self, key: str, value: bytes, *, session: str | None = None) -> int:
        op = _kv_op("lock" if session else "set", validate_key(key),
                    value=check_value(value), session=session)
        return int(self._txn([op])[-1]["ModifyIndex"])

    def cas(self, key: str, value: bytes, index: int, *, session: str | None = None) -> int:
        validate_key(key)
        value = check_value(value)
        if session is None:
            ops = [_kv_op("cas", key, value=value, index=index)]
        else:
            guard = _kv_op("check-index", key, index=index) if index else _kv_op(
                "check-not-exists", key)
            ops = [guard, _kv_op("lock", key, value=value, session=session)]
        return int(self._txn(ops)[-1]["ModifyIndex"])

    def delete(self, key: str, *, index: int | None = None) -> None:
        validate_key(key)
        if index is None:
            res = self._call("DELETE", self._path(key))
            if res.status != 200:
                raise self._fail(res, f"delete {key}")
            return
        if index < 1:
            raise ValueError(f"delete index must be >= 1, got {index}")
        self._txn([_kv_op("check-index", key, index=index), _kv_op("delete", key)])

    def delete_prefix(self, prefix: str) -> None:
        res = self._call("DELETE", self._path(validate_key(prefix, prefix=True)), {"recurse": ""})
        if res.status != 200:
            raise self._fail(res, f"delete prefix {prefix}")

    def list(self, prefix: str) -> Listing:
        res = self._call("GET", self._path(validate_key(prefix, prefix=True)), {"recurse": ""})
        index = int(res.headers.get("x-consul-index", 0))
        if res.status == 404:
            return Listing([], index)
        if res.status != 200:
            raise self._fail(res, f"list {prefix}")
        return Listing([_entry(e) for e in json.loads(res.body)], index)

    def wait(self, prefix: str, index: int, timeout: float) -> WaitResult:
        path = self._path(validate_key(prefix, prefix=True))
        index = max(int(index), 1)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0.001:
            wait_ms = max(1, int(remaining / _JITTER * 1000))
            query = {"recurse": "", "index": index, "wait": f"{wait_ms}ms"}
            res = self._call("GET", path, query, timeout=remaining + self._timeout)
            if res.status not in (200, 404):
                raise self._fail(res, f"wait {prefix}")
            new = int(res.headers.get("x-consul-index", index))
            if new != index:
                return WaitResult(True, new)
        return WaitResult(False, index)

    # ------------------------------------------------------------- sessions
    def create_session(self, ttl: float, *, name: str = "lattice") -> Session:
        body = {"Name": name, "TTL": format_duration(ttl), "Behavior": "delete",
                "LockDelay": "0s", "Checks": []}
        res = self._call("PUT", "/v1/session/create", body=json.dumps(body).encode())
        if res.status != 200:
            raise self._fail(res, "create session")
        return Session(json.loads(res.body)["ID"], float(ttl))

    def renew_session(self, session_id: str) -> float:
        res = self._call("PUT", "/v1/session/renew/" + quote(session_id, safe=""))
        if res.status == 404:
            raise SessionExpired(f"session {session_id} does not exist")
        if res.status != 200:
            raise self._fail(res, "renew session")
        return parse_duration(json.loads(res.body)[0].get("TTL") or "0s")

    def destroy_session(self, session_id: str) -> None:
        res = self._call("PUT", "/v1/session/destroy/" + quote(session_id, safe=""))
        if res.status != 200:
            raise self._fail(res, "destroy session")

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
