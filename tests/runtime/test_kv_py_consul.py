"""The third-party py-consul client (import name ``consul``) against the embedded server.

Covers every Consul call Lattice relies on, so the embedded server is checked
against a client written by someone else, not only against our own.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator

import pytest
from kv_support import in_ci

from lattice.runtime.kv.server import ServerHandle, start_server

pytestmark = pytest.mark.timeout(60)

try:
    import consul
    import consul.exceptions
except ImportError:  # pragma: no cover - depends on the environment
    if in_ci():
        raise
    pytest.skip("py-consul is not installed (pip install py-consul); CI is not set",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # py-consul lets CONSUL_HTTP_TOKEN override the token argument.
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def token_server() -> Iterator[ServerHandle]:
    handle = start_server(token="tok")
    yield handle
    handle.stop()


@pytest.fixture
def client(token_server: ServerHandle) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=token_server.port, token="tok")


def test_kv_get_put_cas_delete(client: consul.Consul) -> None:
    assert client.kv.get("pc/a") == (client.kv.get("pc/a")[0], None)
    assert client.kv.put("pc/a", b"one", cas=0) is True
    assert client.kv.put("pc/a", b"two", cas=0) is False
    index, data = client.kv.get("pc/a")
    assert data["Value"] == b"one" and int(index) == data["ModifyIndex"]
    assert client.kv.put("pc/a", "two", cas=data["ModifyIndex"]) is True
    assert client.kv.put("pc/a", "three", cas=data["ModifyIndex"]) is False
    assert client.kv.get("pc/a")[1]["Value"] == b"two"
    modify = client.kv.get("pc/a")[1]["ModifyIndex"]
    assert client.kv.delete("pc/a", cas=modify + 1) is False
    assert client.kv.delete("pc/a", cas=modify) is True
    assert client.kv.get("pc/a")[1] is None


def test_kv_recurse_keys_and_delete_tree(client: consul.Consul) -> None:
    for key in ("pc/t/1", "pc/t/2", "pc/t/sub/3"):
        client.kv.put(key, key)
    _, entries = client.kv.get("pc/t/", recurse=True)
    assert [e["Key"] for e in entries] == ["pc/t/1", "pc/t/2", "pc/t/sub/3"]
    assert client.kv.get("pc/t/", keys=True, separator="/")[1] == ["pc/t/1", "pc/t/2", "pc/t/sub/"]
    assert client.kv.delete("pc/t/", recurse=True) is True
    assert client.kv.get("pc/t/", recurse=True)[1] is None


def test_kv_blocking_index_returns_on_change_and_on_wait(client: consul.Consul) -> None:
    client.kv.put("pc/b", "0")
    index, _ = client.kv.get("pc/b")
    start = time.monotonic()
    same, _ = client.kv.get("pc/b", index=index, wait="300ms")
    assert same == index and time.monotonic() - start >= 0.29
    timer = threading.Timer(0.2, lambda: client.kv.put("pc/b", "1"))
    timer.start()
    new, data = client.kv.get("pc/b", index=index, wait="10s")
    timer.join()
    assert int(new) > int(index) and data["Value"] == b"1"


def test_session_create_renew_info_destroy_and_lock(client: consul.Consul) -> None:
    sid = client.session.create(name="pc", ttl=10, behavior="delete", lock_delay=0, checks=[])
    assert client.kv.put("pc/lock", "me", acquire=sid) is True
    assert client.kv.get("pc/lock")[1]["Session"] == sid
    renewed = client.session.renew(sid)
    assert renewed["ID"] == sid and renewed["TTL"] == "10s"
    _, info = client.session.info(sid)
    assert info["Behavior"] == "delete" and info["Name"] == "pc"
    assert client.kv.put("pc/lock", "me", release=sid) is True
    assert client.session.destroy(sid) is True
    assert client.session.info(sid)[1] is None
    with pytest.raises(consul.NotFound):
        client.session.renew(sid)


def test_txn_success_and_conflict(server: ServerHandle) -> None:
    # py-consul's txn.put sends no ACL token, so this runs against an open server.
    client = consul.Consul(host="127.0.0.1", port=server.port)
    value = base64.b64encode(b"v").decode()
    ops = [{"KV": {"Verb": "set", "Key": "pc/x", "Value": value}},
           {"KV": {"Verb": "get", "Key": "pc/x"}}]
    result = client.txn.put(ops)
    assert result["Errors"] is None and result["Results"][1]["KV"]["Value"] == value
    with pytest.raises(consul.exceptions.ClientError) as info:
        client.txn.put([{"KV": {"Verb": "check-not-exists", "Key": "pc/x"}}])
    assert "409" in str(info.value)
    body = json.loads(str(info.value).split(" ", 1)[1])
    assert body["Errors"][0]["OpIndex"] == 0


def test_status_and_acl_denial(token_server: ServerHandle, client: consul.Consul) -> None:
    assert client.status.leader() == "127.0.0.1:8300"
    anonymous = consul.Consul(host="127.0.0.1", port=token_server.port)
    with pytest.raises(consul.ACLPermissionDenied):
        anonymous.kv.put("pc/denied", "v")
