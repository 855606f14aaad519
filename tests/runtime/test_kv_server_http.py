"""The embedded server against Consul's documented HTTP behaviour, over real sockets."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lattice.runtime.kv import PermissionDenied, create_backend
from lattice.runtime.kv.server import ServerHandle, start_server

pytestmark = pytest.mark.timeout(60)


def call(
    srv: ServerHandle, method: str, path: str, body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def jcall(srv: ServerHandle, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body)
    status, headers, raw = call(srv, method, path, data)
    if not headers.get("content-type", "").startswith("application/json"):
        return status, raw.decode()
    return status, json.loads(raw) if raw else None


def index_of(srv: ServerHandle, path: str) -> int:
    return int(call(srv, "GET", path)[1]["x-consul-index"])


def test_missing_key_is_404_with_index_and_leader_headers(server: ServerHandle) -> None:
    status, headers, body = call(server, "GET", "/v1/kv/nope")
    assert status == 404 and body == b""
    assert int(headers["x-consul-index"]) >= 1
    assert headers["x-consul-knownleader"] == "true" and headers["x-consul-lastcontact"] == "0"


def test_get_returns_consul_entry_json(server: ServerHandle) -> None:
    assert call(server, "PUT", "/v1/kv/a/b?flags=42", b"hello")[2] == b"true"
    status, headers, body = call(server, "GET", "/v1/kv/a/b")
    (entry,) = json.loads(body)
    assert status == 200 and entry["Key"] == "a/b" and entry["Flags"] == 42
    assert base64.b64decode(entry["Value"]) == b"hello" and entry["LockIndex"] == 0
    assert entry["CreateIndex"] == entry["ModifyIndex"] == int(headers["x-consul-index"])
    assert "Session" not in entry
    status, headers, raw = call(server, "GET", "/v1/kv/a/b?raw")
    assert raw == b"hello" and headers["content-type"].startswith("text/plain")


def test_keys_separator_recurse_and_missing_name(server: ServerHandle) -> None:
    for key in ("web/bar", "web/subdir/x", "web/subdir/y", "other"):
        call(server, "PUT", f"/v1/kv/{key}", b"v")
    assert jcall(server, "GET", "/v1/kv/web/?keys&separator=/")[1] == ["web/bar", "web/subdir/"]
    assert jcall(server, "GET", "/v1/kv/?keys")[1] == ["other", "web/bar", "web/subdir/x", "web/subdir/y"]
    assert len(jcall(server, "GET", "/v1/kv/web?recurse=false")[1]) == 3
    assert call(server, "GET", "/v1/kv/zzz/?keys")[0] == 404
    assert call(server, "GET", "/v1/kv/zzz/?recurse")[0] == 404
    assert call(server, "GET", "/v1/kv/")[0] == 400
    assert call(server, "GET", "/v1/kv/a/../b")[0] == 400


def test_put_cas_flags_and_identical_writes(server: ServerHandle) -> None:
    assert call(server, "PUT", "/v1/kv/c?cas=0", b"1")[2] == b"true"
    assert call(server, "PUT", "/v1/kv/c?cas=0", b"2")[2] == b"false"
    idx = index_of(server, "/v1/kv/c")
    assert call(server, "PUT", f"/v1/kv/c?cas={idx + 5}", b"2")[2] == b"false"
    assert call(server, "PUT", "/v1/kv/c", b"1")[2] == b"true"
    assert index_of(server, "/v1/kv/c") == idx  # identical content: no new index
    assert call(server, "PUT", f"/v1/kv/c?cas={idx}", b"2")[2] == b"true"
    assert index_of(server, "/v1/kv/c") > idx
    assert call(server, "PUT", "/v1/kv/c?cas=1&acquire=x", b"3")[0] == 400


def test_value_size_limit_is_413(server: ServerHandle) -> None:
    assert call(server, "PUT", "/v1/kv/big", b"x" * 512 * 1024)[0] == 200
    assert call(server, "PUT", "/v1/kv/big", b"x" * (512 * 1024 + 1))[0] == 413
    assert len(call(server, "GET", "/v1/kv/big?raw")[2]) == 512 * 1024


def test_delete_cas_and_recurse(server: ServerHandle) -> None:
    call(server, "PUT", "/v1/kv/d/1", b"v")
    call(server, "PUT", "/v1/kv/d/2", b"v")
    idx = index_of(server, "/v1/kv/d/1")
    assert call(server, "DELETE", f"/v1/kv/d/1?cas={idx + 1}")[2] == b"false"
    assert call(server, "DELETE", f"/v1/kv/d/1?cas={idx}")[2] == b"true"
    assert call(server, "DELETE", "/v1/kv/d?recurse&cas=1")[0] == 400
    before = index_of(server, "/v1/kv/d/?recurse")
    assert call(server, "DELETE", "/v1/kv/d/?recurse")[2] == b"true"
    assert call(server, "GET", "/v1/kv/d/?recurse")[0] == 404
    assert index_of(server, "/v1/kv/d/?recurse") > before  # tombstones raise the index


def _session(srv: ServerHandle, **body: Any) -> str:
    status, data = jcall(srv, "PUT", "/v1/session/create", body)
    assert status == 200, data
    return data["ID"]


def test_acquire_release_and_lock_index(server: ServerHandle) -> None:
    s1, s2 = _session(server, LockDelay="0s"), _session(server, LockDelay="0s")
    assert call(server, "PUT", f"/v1/kv/l?acquire={s1}", b"a")[2] == b"true"
    assert call(server, "PUT", f"/v1/kv/l?acquire={s2}", b"b")[2] == b"false"
    assert call(server, "PUT", "/v1/kv/l", b"plain")[2] == b"true"
    (entry,) = jcall(server, "GET", "/v1/kv/l")[1]
    assert entry["Session"] == s1 and entry["LockIndex"] == 1
    assert call(server, "PUT", f"/v1/kv/l?release={s2}", b"x")[2] == b"false"
    assert call(server, "PUT", f"/v1/kv/l?release={s1}", b"x")[2] == b"true"
    assert call(server, "PUT", f"/v1/kv/l?acquire={s2}", b"b")[2] == b"true"
    (entry,) = jcall(server, "GET", "/v1/kv/l")[1]
    assert entry["Session"] == s2 and entry["LockIndex"] == 2
    assert call(server, "PUT", "/v1/kv/l2?acquire=no-such-session", b"x")[0] == 500


def test_session_ttl_range_behavior_and_info() -> None:
    with start_server() as srv:  # Consul's 10s minimum
        assert jcall(srv, "PUT", "/v1/session/create", {"TTL": "5s"})[0] == 400
        assert jcall(srv, "PUT", "/v1/session/create", {"TTL": "86401s"})[0] == 400
        assert jcall(srv, "PUT", "/v1/session/create", {"Behavior": "explode"})[0] == 400
        sid = _session(srv, ttl="10s", name="lower-case-fields", behavior="delete")
        (info,) = jcall(srv, "GET", f"/v1/session/info/{sid}")[1]
        assert info["TTL"] == "10s" and info["Behavior"] == "delete" and info["Name"] == "lower-case-fields"
        assert info["LockDelay"] == 15 * 10**9
        assert jcall(srv, "PUT", f"/v1/session/renew/{sid}")[1][0]["ID"] == sid
        assert jcall(srv, "PUT", f"/v1/session/destroy/{sid}")[1] is True
        assert jcall(srv, "PUT", f"/v1/session/destroy/{sid}")[1] is True
        assert jcall(srv, "GET", f"/v1/session/info/{sid}") == (200, [])
        assert call(srv, "PUT", f"/v1/session/renew/{sid}")[0] == 404


def test_release_behavior_keeps_keys_and_lock_delay_blocks_reacquire(server: ServerHandle) -> None:
    sid = _session(server, Behavior="release", LockDelay="30s")
    call(server, "PUT", f"/v1/kv/r?acquire={sid}", b"v")
    call(server, "PUT", f"/v1/session/destroy/{sid}")
    (entry,) = jcall(server, "GET", "/v1/kv/r")[1]
    assert "Session" not in entry and entry["LockIndex"] == 1
    other = _session(server)
    assert call(server, "PUT", f"/v1/kv/r?acquire={other}", b"v")[2] == b"false"


def test_session_ttl_expiry_releases_keys(server: ServerHandle) -> None:
    sid = _session(server, TTL="500ms", LockDelay=0)
    call(server, "PUT", f"/v1/kv/e?acquire={sid}", b"v")
    idx = index_of(server, "/v1/kv/e")
    start = time.monotonic()
    status, headers, body = call(server, "GET", f"/v1/kv/e?index={idx}&wait=5s")
    assert time.monotonic() - start < 3  # TTL x 2 plus the reaper's slack
    assert "Session" not in json.loads(body)[0]
    assert jcall(server, "GET", f"/v1/session/info/{sid}")[1] == []


def test_blocking_query_times_out_and_wakes_on_write(server: ServerHandle) -> None:
    call(server, "PUT", "/v1/kv/b/k", b"0")
    idx = index_of(server, "/v1/kv/b/?recurse")
    start = time.monotonic()
    status, headers, _ = call(server, "GET", f"/v1/kv/b/?recurse&index={idx}&wait=300ms")
    assert 0.29 < time.monotonic() - start < 2 and int(headers["x-consul-index"]) == idx
    timer = threading.Timer(0.2, lambda: call(server, "PUT", "/v1/kv/b/k", b"1"))
    timer.start()
    start = time.monotonic()
    status, headers, _ = call(server, "GET", f"/v1/kv/b/?recurse&index={idx}&wait=10s")
    timer.join()
    assert time.monotonic() - start < 5 and int(headers["x-consul-index"]) > idx


def _op(verb: str, key: str, **kw: Any) -> dict[str, Any]:
    if "Value" in kw:
        kw["Value"] = base64.b64encode(kw["Value"]).decode()
    return {"KV": {"Verb": verb, "Key": key, **kw}}


def test_txn_commits_atomically_or_returns_409(server: ServerHandle) -> None:
    status, body = jcall(server, "PUT", "/v1/txn", [_op("set", "t/a", Value=b"1"), _op("get", "t/a")])
    assert status == 200 and body["Errors"] is None
    set_res, get_res = (r["KV"] for r in body["Results"])
    assert set_res["Value"] is None and base64.b64decode(get_res["Value"]) == b"1"
    idx = set_res["ModifyIndex"]
    ops = [_op("set", "t/b", Value=b"2"), _op("check-index", "t/a", Index=idx + 9),
           _op("check-not-exists", "t/a")]
    status, body = jcall(server, "PUT", "/v1/txn", ops)
    assert status == 409 and body["Results"] is None
    assert [e["OpIndex"] for e in body["Errors"]] == [1, 2]
    assert call(server, "GET", "/v1/kv/t/b")[0] == 404  # rolled back
    ops = [_op("cas", "t/a", Value=b"3", Index=idx), _op("delete-cas", "t/a", Index=idx + 9)]
    assert jcall(server, "PUT", "/v1/txn", ops)[0] == 409
    assert jcall(server, "PUT", "/v1/txn", [_op("cas", "t/a", Value=b"3", Index=idx)])[0] == 200
    assert jcall(server, "PUT", "/v1/txn", [_op("set", f"t/{i}", Value=b"") for i in range(129)])[0] == 413
    assert call(server, "PUT", "/v1/txn", b"{not json")[0] == 400


def test_txn_lock_unlock_and_status_leader(server: ServerHandle) -> None:
    sid = _session(server, LockDelay="0s")
    ops = [_op("lock", "t/l", Value=b"x", Session=sid), _op("check-session", "t/l", Session=sid)]
    assert jcall(server, "PUT", "/v1/txn", ops)[0] == 200
    assert jcall(server, "PUT", "/v1/txn", [_op("unlock", "t/l", Value=b"y", Session=sid)])[0] == 200
    assert jcall(server, "GET", "/v1/status/leader") == (200, "127.0.0.1:8300")


def test_acl_token_is_required_when_configured() -> None:
    with start_server(token="s3cret") as srv:
        assert call(srv, "GET", "/v1/kv/x")[0] == 403
        assert call(srv, "GET", "/v1/kv/x", headers={"X-Consul-Token": "wrong"})[0] == 403
        assert call(srv, "GET", "/v1/kv/x", headers={"X-Consul-Token": "s3cret"})[0] == 404
        assert call(srv, "GET", "/v1/kv/x?token=s3cret")[0] == 404
        assert call(srv, "GET", "/v1/kv/x", headers={"Authorization": "Bearer s3cret"})[0] == 404
        assert call(srv, "GET", "/v1/status/leader")[0] == 200
        with create_backend("consul", url=srv.url, token="s3cret") as kv:
            kv.put("x", b"v")
        with create_backend("consul", url=srv.url) as kv, pytest.raises(PermissionDenied):
            kv.get("x")


def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    cmd = [sys.executable, "-m", "lattice.runtime.kv.server", "--port", "0",
           "--token-file", str(tmp_path / "token")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        line = proc.stdout.readline()
        url = line.rsplit(" ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        with create_backend("consul", url=url, token="tok") as kv:
            kv.put("k", b"v")
            assert kv.get("k").value == b"v"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
