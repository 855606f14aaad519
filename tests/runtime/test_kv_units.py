"""Small pure pieces of the KV layer: durations, etcd helpers, value checks, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from lattice.runtime.kv import KVUnavailable, create_backend
from lattice.runtime.kv.api import check_value
from lattice.runtime.kv.durations import format_duration, parse_duration, parse_lock_delay
from lattice.runtime.kv.etcd import _api_prefix, prefix_end
from lattice.runtime.kv.server import start_server

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("1m30s", 90.0), ("250ms", 0.25), ("1.5h", 5400.0), ("0", 0.0), ("2us", 2e-6)],
)
def test_parse_duration_reads_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "s", "10x", "1s2"])
def test_parse_duration_rejects_malformed_text(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_and_lock_delay_round_trip() -> None:
    assert format_duration(10) == "10s" and format_duration(0.5) == "500ms"
    assert parse_lock_delay(15) == 15.0 and parse_lock_delay(2_000_000_000) == 2.0
    assert parse_lock_delay("0s") == 0.0


def test_etcd_prefix_end_handles_trailing_ff() -> None:
    assert prefix_end(b"foo") == b"fop"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\x00"


@pytest.mark.parametrize(
    ("version", "prefix"), [("3.4.23", "/v3"), ("3.5.9", "/v3"), ("3.3.11", "/v3beta"), ("3.2.0", "/v3alpha")]
)
def test_etcd_gateway_prefix_follows_server_version(version: str, prefix: str) -> None:
    assert _api_prefix(version) == prefix


def test_check_value_rejects_text() -> None:
    with pytest.raises(TypeError, match="bytes"):
        check_value("text")  # type: ignore[arg-type]


def test_stop_wakes_blocked_queries_promptly() -> None:
    handle = start_server()
    kv = create_backend("consul", url=handle.url)
    index = kv.list("x/").index
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(kv.wait("x/", index, 30))
        except KVUnavailable as exc:  # the retry after the wake-up finds no server
            outcome.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    handle.stop()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - start < 5
    assert isinstance(outcome[0], KVUnavailable)
