"""One contract for every KV backend: embedded, consul (against the embedded server), etcd."""

from __future__ import annotations

import threading
import time

import pytest
from kv_support import KVCase, free_port

from lattice.runtime.kv import (
    MAX_VALUE_SIZE,
    CASConflict,
    InvalidKey,
    KVStore,
    KVUnavailable,
    SessionExpired,
    UnknownBackend,
    ValueTooLarge,
    backend_names,
    create_backend,
)

pytestmark = pytest.mark.timeout(60)


def _put_later(kv: KVStore, key: str, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), kv.put(key, b"x")))
    t.start()
    return t


class TestKVContract:
    def test_get_returns_none_for_missing_key(self, kv: KVStore, prefix: str) -> None:
        assert kv.get(prefix + "missing") is None

    def test_put_then_get_returns_value_and_rising_index(self, kv: KVStore, prefix: str) -> None:
        first = kv.put(prefix + "a", b"one")
        entry = kv.get(prefix + "a")
        assert entry is not None and entry.value == b"one" and entry.mod_index == first
        second = kv.put(prefix + "a", b"two")
        assert second > first
        assert kv.get(prefix + "a").value == b"two"

    def test_binary_and_empty_values_round_trip(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "bin", bytes(range(256)))
        kv.put(prefix + "empty", b"")
        assert kv.get(prefix + "bin").value == bytes(range(256))
        assert kv.get(prefix + "empty").value == b""

    def test_cas_with_index_zero_creates_only_when_absent(self, kv: KVStore, prefix: str) -> None:
        idx = kv.cas(prefix + "c", b"first", 0)
        assert kv.get(prefix + "c").mod_index == idx
        with pytest.raises(CASConflict):
            kv.cas(prefix + "c", b"second", 0)
        assert kv.get(prefix + "c").value == b"first"

    def test_cas_fails_on_stale_index_and_succeeds_on_current(self, kv: KVStore, prefix: str) -> None:
        old = kv.put(prefix + "k", b"v1")
        new = kv.cas(prefix + "k", b"v2", old)
        assert new > old
        with pytest.raises(CASConflict):
            kv.cas(prefix + "k", b"v3", old)
        with pytest.raises(CASConflict):
            kv.cas(prefix + "absent", b"v", 12345)
        assert kv.get(prefix + "k").value == b"v2"

    def test_concurrent_cas_has_exactly_one_winner(self, kv: KVStore, prefix: str) -> None:
        index = kv.put(prefix + "race", b"start")
        barrier, wins, losses = threading.Barrier(8), [], []

        def contend(n: int) -> None:
            barrier.wait()
            try:
                kv.cas(prefix + "race", f"w{n}".encode(), index)
                wins.append(n)
            except CASConflict:
                losses.append(n)

        threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert len(wins) == 1 and len(losses) == 7
        assert kv.get(prefix + "race").value == f"w{wins[0]}".encode()

    def test_delete_removes_key_and_ignores_missing(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "d", b"v")
        kv.delete(prefix + "d")
        assert kv.get(prefix + "d") is None
        kv.delete(prefix + "d")

    def test_delete_with_index_is_compare_and_delete(self, kv: KVStore, prefix: str) -> None:
        idx = kv.put(prefix + "d", b"v")
        with pytest.raises(CASConflict):
            kv.delete(prefix + "d", index=idx + 100)
        assert kv.get(prefix + "d") is not None
        kv.delete(prefix + "d", index=idx)
        assert kv.get(prefix + "d") is None
        with pytest.raises(CASConflict):
            kv.delete(prefix + "d", index=idx)

    def test_list_returns_sorted_entries_under_prefix_only(self, kv: KVStore, prefix: str) -> None:
        for key in ("b", "a", "sub/c"):
            kv.put(prefix + "dir/" + key, key.encode())
        kv.put(prefix + "dirx", b"sibling")
        listing = kv.list(prefix + "dir/")
        assert [e.key for e in listing.entries] == [prefix + "dir/" + k for k in ("a", "b", "sub/c")]
        assert listing.index >= max(e.mod_index for e in listing.entries)
        assert kv.list(prefix + "nothing/").entries == []

    def test_delete_prefix_removes_everything_under_it(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "p/1", b"1")
        kv.put(prefix + "p/2", b"2")
        kv.put(prefix + "q", b"keep")
        kv.delete_prefix(prefix + "p/")
        assert kv.list(prefix + "p/").entries == []
        assert kv.get(prefix + "q").value == b"keep"

    def test_wait_returns_soon_after_a_put(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "w/seed", b"0")
        listing = kv.list(prefix + "w/")
        writer = _put_later(kv, prefix + "w/new", 0.3)
        start = time.monotonic()
        result = kv.wait(prefix + "w/", listing.index, timeout=10)
        writer.join()
        assert result.changed and result.index > listing.index
        assert time.monotonic() - start < 5
        assert kv.get(prefix + "w/new") is not None

    def test_wait_sees_a_change_made_before_it_was_called(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "w/seed", b"0")
        listing = kv.list(prefix + "w/")
        kv.put(prefix + "w/seed", b"1")
        assert kv.wait(prefix + "w/", listing.index, timeout=5).changed

    def test_wait_returns_on_delete(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "w/a", b"0")
        kv.put(prefix + "w/b", b"0")
        listing = kv.list(prefix + "w/")
        kv.delete(prefix + "w/a")
        assert kv.wait(prefix + "w/", listing.index, timeout=5).changed

    def test_wait_times_out_without_changes(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "w/seed", b"0")
        listing = kv.list(prefix + "w/")
        kv.put(prefix + "elsewhere", b"unrelated")
        start = time.monotonic()
        result = kv.wait(prefix + "w/", listing.index, timeout=0.6)
        elapsed = time.monotonic() - start
        assert not result.changed and result.index == listing.index
        assert 0.5 <= elapsed < 3

    def test_session_key_survives_renewals_then_expires(self, kv_case: KVCase, prefix: str) -> None:
        kv, ttl = kv_case.kv, kv_case.ttl
        session = kv.create_session(ttl)
        assert session.ttl >= ttl
        kv.put(prefix + "member", b"alive", session=session.id)
        until = time.monotonic() + kv_case.renew_window
        while time.monotonic() < until:
            assert kv.renew_session(session.id) > 0
            time.sleep(ttl / 4)
        assert kv.get(prefix + "member") is not None
        listing = kv.list(prefix)
        deadline = time.monotonic() + 2 * session.ttl + 4
        while kv.get(prefix + "member") is not None and time.monotonic() < deadline:
            listing = kv.list(prefix)
            kv.wait(prefix, listing.index, timeout=max(0.1, deadline - time.monotonic()))
        assert kv.get(prefix + "member") is None
        with pytest.raises(SessionExpired):
            kv.renew_session(session.id)

    def test_destroying_a_session_deletes_its_keys(self, kv_case: KVCase, prefix: str) -> None:
        kv = kv_case.kv
        session = kv.create_session(kv_case.ttl * 10)
        idx = kv.cas(prefix + "lock", b"me", 0, session=session.id)
        assert kv.get(prefix + "lock").mod_index == idx
        kv.put(prefix + "other", b"free")
        kv.destroy_session(session.id)
        assert kv.get(prefix + "lock") is None
        assert kv.get(prefix + "other") is not None
        kv.destroy_session(session.id)  # idempotent
        with pytest.raises(SessionExpired):
            kv.renew_session(session.id)

    def test_writing_with_a_dead_session_raises_session_expired(self, kv_case: KVCase, prefix: str) -> None:
        kv = kv_case.kv
        session = kv.create_session(kv_case.ttl * 10)
        kv.destroy_session(session.id)
        with pytest.raises(SessionExpired):
            kv.put(prefix + "k", b"v", session=session.id)
        assert kv.get(prefix + "k") is None

    def test_value_over_the_portable_limit_is_refused(self, kv: KVStore, prefix: str) -> None:
        kv.put(prefix + "big", b"x" * MAX_VALUE_SIZE)
        with pytest.raises(ValueTooLarge):
            kv.put(prefix + "big", b"x" * (MAX_VALUE_SIZE + 1))
        assert len(kv.get(prefix + "big").value) == MAX_VALUE_SIZE

    @pytest.mark.parametrize("bad", ["", "/abs", "a//b", "a/../b", "sp ace", "ünï"])
    def test_invalid_keys_are_refused(self, kv: KVStore, bad: str) -> None:
        with pytest.raises(InvalidKey):
            kv.put(bad, b"v")


@pytest.mark.timeout(60)
def test_unknown_backend_error_lists_valid_names() -> None:
    with pytest.raises(UnknownBackend) as info:
        create_backend("zookeeper")
    for name in ("consul", "embedded", "etcd"):
        assert name in backend_names() and name in str(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["consul", "etcd"])
def test_unreachable_store_raises_kv_unavailable(name: str) -> None:
    kv = create_backend(name, url=f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(KVUnavailable):
        kv.get("some/key")
