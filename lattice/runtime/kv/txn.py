"""Consul's ``/v1/txn`` (KV verbs) and entry JSON for the embedded server.

A transaction is parsed completely first (a malformed body is a 400, an
oversized value a 413, before anything runs), then every op runs inside one
:meth:`MemStore.batch` so its writes share one index and roll back together.
Like Consul, all failing ops are reported, each with its ``OpIndex``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lattice.runtime.kv.memstore import Batch, Entry, MemStore, OpError

MAX_TXN_OPS = 128


class TxnRequestError(ValueError):
    """The transaction body is unusable; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Rollback(Exception):
    pass


@dataclass(frozen=True)
class KVOp:
    """One parsed ``{"KV": {...}}`` operation."""

    verb: str
    key: str
    value: bytes
    flags: int
    index: int
    session: str


def entry_json(entry: Entry, *, with_value: bool = True) -> dict[str, Any]:
    """Render an entry the way Consul's KV and txn endpoints do."""
    out: dict[str, Any] = {
        "LockIndex": entry.lock_index,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": base64.b64encode(entry.value).decode() if with_value and entry.value else None,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }
    if entry.session:
        out["Session"] = entry.session
    return out


def parse_ops(body: Any, max_value_size: int) -> list[KVOp]:
    """Validate and parse a transaction body.

    Raises:
        TxnRequestError: 400 for a malformed body, 413 for too many ops or a
            value over ``max_value_size``.
    """
    if not isinstance(body, list):
        raise TxnRequestError(400, "Failed to parse body: expected a JSON array of operations")
    if len(body) > MAX_TXN_OPS:
        raise TxnRequestError(
            413, f"Transaction contains too many operations ({len(body)} > {MAX_TXN_OPS})"
        )
    return [_parse_op(op, max_value_size) for op in body]


def _parse_op(op: Any, max_value_size: int) -> KVOp:
    fields = {str(k).lower(): v for k, v in op.items()} if isinstance(op, dict) else {}
    kv = fields.get("kv")
    if not isinstance(kv, dict):
        raise TxnRequestError(400, "Failed to parse body: only KV operations are supported")
    kv = {str(k).lower(): v for k, v in kv.items()}
    try:
        value = base64.b64decode(kv.get("value") or "", validate=True)
        flags, index = int(kv.get("flags") or 0), int(kv.get("index") or 0)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise TxnRequestError(400, f"Failed to parse body: {exc}") from None
    key = str(kv.get("key") or "")
    if len(value) > max_value_size:
        raise TxnRequestError(
            413, f'Value for key "{key}" is too large ({len(value)} > {max_value_size} bytes)'
        )
    verb = str(kv.get("verb") or "")
    return KVOp(verb, key, value, flags, index, str(kv.get("session") or ""))


def _get(b: Batch, op: KVOp) -> list[Entry]:
    entry = b.get(op.key)
    if entry is None:
        raise OpError(f'key "{op.key}" doesn\'t exist')
    return [entry]


def _get_or_empty(b: Batch, op: KVOp) -> list[Entry]:
    entry = b.get(op.key)
    return [entry] if entry else []


def _checked(fn: Callable[[Batch, KVOp], Any]) -> Callable[[Batch, KVOp], list[Entry]]:
    def run(b: Batch, op: KVOp) -> list[Entry]:
        result = fn(b, op)
        return [result] if isinstance(result, Entry) else []

    return run


_VERBS: dict[str, Callable[[Batch, KVOp], list[Entry]]] = {
    "set": _checked(lambda b, op: b.set(op.key, op.value, op.flags)),
    "cas": _checked(lambda b, op: b.cas(op.key, op.value, op.flags, op.index)),
    "lock": _checked(lambda b, op: b.lock(op.key, op.value, op.flags, op.session)),
    "unlock": _checked(lambda b, op: b.unlock(op.key, op.value, op.flags, op.session)),
    "get": _get,
    "get-or-empty": _get_or_empty,
    "get-tree": lambda b, op: b.tree(op.key),
    "check-index": _checked(lambda b, op: b.check_index(op.key, op.index)),
    "check-session": _checked(lambda b, op: b.check_session(op.key, op.session)),
    "check-not-exists": _checked(lambda b, op: b.check_not_exists(op.key)),
    "delete": _checked(lambda b, op: b.delete(op.key)),
    "delete-tree": _checked(lambda b, op: b.delete_tree(op.key)),
    "delete-cas": _checked(lambda b, op: b.delete_cas(op.key, op.index)),
}
_READS = {"get", "get-tree", "get-or-empty"}


def _apply(b: Batch, op: KVOp) -> list[dict[str, Any]]:
    handler = _VERBS.get(op.verb)
    if handler is None:
        raise OpError(f'unknown KV verb "{op.verb}"')
    if op.verb not in ("get-tree", "delete-tree") and not op.key:
        raise OpError(f'missing key for verb "{op.verb}"')
    return [entry_json(e, with_value=op.verb in _READS) for e in handler(b, op)]


def run_txn(store: MemStore, ops: list[KVOp]) -> tuple[int, dict[str, Any]]:
    """Run parsed ops atomically; return ``(http_status, response_body)``."""
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    try:
        with store.batch() as b:
            for i, op in enumerate(ops):
                try:
                    results.extend({"KV": r} for r in _apply(b, op))
                except OpError as exc:
                    errors.append({"OpIndex": i, "What": str(exc)})
            if errors:
                raise _Rollback
    except _Rollback:
        return 409, {"Results": None, "Errors": errors}
    return 200, {"Results": results, "Errors": None}
