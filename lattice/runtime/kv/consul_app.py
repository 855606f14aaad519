"""Consul HTTP API routes of the embedded server, independent of the socket layer.

:class:`ConsulApp` turns a parsed :class:`Request` into a :class:`Response`
following Consul's documented rules for the subset Lattice uses: ``/v1/kv``,
``/v1/txn``, ``/v1/session/*`` and ``/v1/status/*`` (status codes, ``true`` /
``false`` bodies, ``X-Consul-Index`` on every response, blocking queries with
``index`` + ``wait``, ACL token checks). :mod:`server` only moves bytes.
"""

from __future__ import annotations

import hmac
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lattice.runtime.kv.durations import parse_duration
from lattice.runtime.kv.memsessions import SessionRequestError, parse_session_request
from lattice.runtime.kv.memstore import InvalidSession, MemStore, OpError
from lattice.runtime.kv.txn import TxnRequestError, entry_json, parse_ops, run_txn

MAX_VALUE_SIZE = 512 * 1024
"""Consul's default ``kv_max_value_size``."""
TXN_MAX_REQ_LEN = 512 * 1024
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
LEADER = "127.0.0.1:8300"


@dataclass
class Request:
    """A parsed HTTP request: ``path`` is URL-decoded, ``query`` keeps the last value."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Response:
    """What to send back; ``index`` becomes ``X-Consul-Index`` (None: current raft index)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    index: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class HTTPError(Exception):
    """Raised by a route to answer ``status`` with a plain-text ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(data: Any, status: int = 200, index: int | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), index=index)


TRUE, FALSE = b"true", b"false"


class ConsulApp:
    """The routes of the embedded Consul-compatible server.

    Args:
        store: the state to serve.
        token: when set, every route except ``/v1/status/*`` needs this ACL token.
    """

    def __init__(self, store: MemStore, token: str | None = None) -> None:
        self.store = store
        self.token = token
        self._routes: list[tuple[str, str, Callable[[Request, str], Response]]] = [
            ("GET", "/v1/kv/", self._kv_get),
            ("PUT", "/v1/kv/", self._kv_put),
            ("DELETE", "/v1/kv/", self._kv_delete),
            ("PUT", "/v1/txn", self._txn),
            ("PUT", "/v1/session/create", self._session_create),
            ("PUT", "/v1/session/renew/", self._session_renew),
            ("PUT", "/v1/session/destroy/", self._session_destroy),
            ("GET", "/v1/session/info/", self._session_info),
            ("GET", "/v1/session/list", self._session_list),
            ("GET", "/v1/session/node/", self._session_node),
        ]

    def handle(self, req: Request) -> Response:
        """Answer one request (never raises for bad input)."""
        try:
            resp = self._route(req)
        except HTTPError as exc:
            resp = Response(exc.status, str(exc).encode(), "text/plain; charset=utf-8")
        if resp.index is None:
            with self.store.cond:
                resp.index = max(1, self.store.raft_index)
        return resp

    def _route(self, req: Request) -> Response:
        if req.path == "/v1/status/leader":
            return _json(LEADER)
        if req.path == "/v1/status/peers":
            return _json([LEADER])
        self._check_acl(req)
        methods = set()
        for method, prefix, handler in self._routes:
            exact = not prefix.endswith("/")
            if (exact and req.path == prefix) or (not exact and req.path.startswith(prefix)):
                methods.add(method)
                if method == req.method or (req.method == "POST" and method == "PUT"):
                    return handler(req, req.path[len(prefix):])
        if methods:
            raise HTTPError(405, f"method {req.method} not allowed")
        raise HTTPError(404, f"no such endpoint: {req.path}")

    def _check_acl(self, req: Request) -> None:
        if self.token is None:
            return
        given = req.headers.get("x-consul-token") or req.query.get("token")
        auth = req.headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise HTTPError(403, "Permission denied")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPError(403, "ACL not found")

    # ---------------------------------------------------------------- blocking
    @staticmethod
    def _blocking(q: dict[str, str]) -> tuple[int, float]:
        try:
            index = int(q.get("index") or 0)
            wait = parse_duration(q["wait"]) if q.get("wait") else DEFAULT_WAIT
        except ValueError as exc:
            raise HTTPError(400, f"Invalid blocking query parameters: {exc}") from None
        wait = min(max(wait, 0.0), MAX_WAIT)
        return index, wait + random.uniform(0, wait / 16)

    # ---------------------------------------------------------------------- kv
    @staticmethod
    def _check_key(key: str, *, allow_empty: bool) -> None:
        if not key and not allow_empty:
            raise HTTPError(400, "Missing key name")
        if key != key.strip() or ".." in key.split("/"):
            raise HTTPError(400, f"Invalid key name {key!r}")

    def _kv_get(self, req: Request, key: str) -> Response:
        q = req.query
        list_keys = "keys" in q
        recurse = "recurse" in q or list_keys
        self._check_key(key, allow_empty=recurse)
        index, wait = self._blocking(q)
        st = self.store
        with st.cond:
            index_fn = (lambda: st.prefix_index(key)) if recurse else (lambda: st.key_index(key))
            idx = st.block(index_fn, index, wait)
            if list_keys:
                return self._keys(key, q.get("separator", q.get("seperator", "")), idx)
            if recurse:
                entries = [st.kv[k] for k in sorted(st.kv) if k.startswith(key)]
                if not entries:
                    return Response(404, index=idx)
                return _json([entry_json(e) for e in entries], index=idx)
            entry = st.kv.get(key)
        if entry is None:
            return Response(404, index=idx)
        if "raw" in q:
            return Response(200, entry.value, "text/plain", idx, {"X-Content-Type-Options": "nosniff"})
        return _json([entry_json(entry)], index=idx)

    def _keys(self, prefix: str, sep: str, idx: int) -> Response:
        names: dict[str, None] = {}
        for k in sorted(self.store.kv):
            if not k.startswith(prefix):
                continue
            cut = k.find(sep, len(prefix)) if sep else -1
            names[k[: cut + len(sep)] if cut >= 0 else k] = None
        if not names and prefix:
            return Response(404, index=idx)
        return _json(list(names), index=idx)

    def _kv_put(self, req: Request, key: str) -> Response:
        q = req.query
        self._check_key(key, allow_empty=False)
        given = [name for name in ("cas", "acquire", "release") if name in q]
        if len(given) > 1:
            raise HTTPError(400, f"Conflicting flags: {'&'.join(given)}")
        if len(req.body) > MAX_VALUE_SIZE:
            raise HTTPError(413, f"Value exceeds {MAX_VALUE_SIZE} byte limit")
        try:
            flags = int(q.get("flags") or 0)
            cas = int(q["cas"]) if "cas" in q else None
        except ValueError:
            raise HTTPError(400, "Invalid flags or cas parameter") from None
        try:
            with self.store.batch() as b:
                if "acquire" in q:
                    b.lock(key, req.body, flags, q["acquire"])
                elif "release" in q:
                    b.unlock(key, req.body, flags, q["release"])
                elif cas is not None:
                    b.cas(key, req.body, flags, cas)
                else:
                    b.set(key, req.body, flags)
        except InvalidSession as exc:
            raise HTTPError(500, str(exc)) from None
        except OpError:
            return Response(200, FALSE)
        return Response(200, TRUE)

    def _kv_delete(self, req: Request, key: str) -> Response:
        q = req.query
        recurse = "recurse" in q
        self._check_key(key, allow_empty=recurse)
        if recurse and "cas" in q:
            raise HTTPError(400, "Conflicting flags: cas&recurse")
        try:
            with self.store.batch() as b:
                if recurse:
                    b.delete_tree(key)
                elif "cas" in q:
                    b.delete_cas(key, int(q["cas"]))
                else:
                    b.delete(key)
        except ValueError:
            raise HTTPError(400, "Invalid cas parameter") from None
        except OpError:
            return Response(200, FALSE)
        return Response(200, TRUE)

    # --------------------------------------------------------------------- txn
    def _txn(self, req: Request, _: str) -> Response:
        if len(req.body) > max(TXN_MAX_REQ_LEN, MAX_VALUE_SIZE):
            raise HTTPError(413, f"Request body({len(req.body)} bytes) too large")
        try:
            ops = parse_ops(json.loads(req.body or b"null"), MAX_VALUE_SIZE)
        except json.JSONDecodeError as exc:
            raise HTTPError(400, f"Failed to parse body: {exc}") from None
        except TxnRequestError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        status, body = run_txn(self.store, ops)
        return _json(body, status)

    # ---------------------------------------------------------------- sessions
    def _session_create(self, req: Request, _: str) -> Response:
        try:
            body = json.loads(req.body) if req.body.strip() else {}
            if not isinstance(body, dict):
                raise SessionRequestError("Request decode failed: expected a JSON object")
            rec = parse_session_request(body, min_ttl=self.store.min_session_ttl)
        except (json.JSONDecodeError, SessionRequestError) as exc:
            raise HTTPError(400, str(exc)) from None
        rec = self.store.create_session(rec)
        return _json({"ID": rec.id}, index=rec.create_index)

    def _session_renew(self, req: Request, session_id: str) -> Response:
        rec = self.store.renew_session(session_id)
        if rec is None:
            raise HTTPError(404, f"Session id '{session_id}' not found")
        return _json([rec.to_json()], index=self.store.session_index or 1)

    def _session_destroy(self, req: Request, session_id: str) -> Response:
        self.store.destroy_session(session_id)
        return Response(200, TRUE)

    def _session_query(self, req: Request, pick: Callable[[], list[Any]]) -> Response:
        index, wait = self._blocking(req.query)
        st = self.store
        with st.cond:
            idx = st.block(lambda: max(1, st.session_index), index, wait)
            return _json([rec.to_json() for rec in pick()], index=idx)

    def _session_info(self, req: Request, session_id: str) -> Response:
        sessions = self.store.sessions
        return self._session_query(req, lambda: [s for s in [sessions.get(session_id)] if s])

    def _session_list(self, req: Request, _: str) -> Response:
        return self._session_query(req, lambda: list(self.store.sessions.values()))

    def _session_node(self, req: Request, node: str) -> Response:
        return self._session_query(
            req, lambda: [s for s in self.store.sessions.values() if s.node == node]
        )
