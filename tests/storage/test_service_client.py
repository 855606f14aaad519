"""The ``lattice://`` client against a test double of the service: a raw HTTP server on 127.0.0.1
that misbehaves on purpose (reads slowly, ignores ``Range``, hangs up in the middle of a body),
as a slow network, a proxy or a crash would."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import crc32c
import pytest

from lattice.core.stores.service import ServiceStore
from lattice.core.stores.transfer import TransientStoreError

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


class FakeService:
    """One connection at a time: reads the request (headers, then ``Content-Length`` bytes of body
    at ``read_rate`` bytes/s if set) and answers with what ``answer(headers)`` returns."""

    def __init__(self, answer: Callable[[str], bytes], read_rate: float | None = None):
        self.answer, self.read_rate = answer, read_rate
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        text, _, body = head.partition(b"\r\n\r\n")
        headers = text.decode("latin-1")
        length = next((int(line.split(":", 1)[1]) for line in headers.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        got = len(body)
        while got < length:
            chunk = conn.recv(min(MiB, length - got))
            if not chunk:
                return
            got += len(chunk)
            if self.read_rate:
                time.sleep(len(chunk) / self.read_rate)
        self.received = got
        conn.sendall(self.answer(headers))

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeService]]:
    made: list[FakeService] = []

    def make(answer: Callable[[str], bytes], read_rate: float | None = None) -> FakeService:
        made.append(FakeService(answer, read_rate))
        return made[-1]

    yield make
    for f in made:
        f.close()


def created(_: str) -> bytes:
    return b'HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}'


def test_a_put_from_memory_to_a_slow_service_is_not_cut_by_the_timeout(fake: Callable[..., FakeService]) -> None:
    """The timeout bounds each send, not the whole body: 48 MiB at 20 MiB/s takes 2.4 s, over a
    2 s timeout, and must still go through (one ``sendall`` of it all used to time out)."""
    service = fake(created, read_rate=20 * MiB)
    store = ServiceStore(f"lattice://127.0.0.1:{service.port}/job", token="t", timeout=2.0)
    data = memoryview(bytes(48 * MiB))
    t0 = time.monotonic()
    store.put_file(1, "data.safetensors", data, len(data), crc32c.crc32c(data))
    assert time.monotonic() - t0 > 2.0 and service.received == 48 * MiB


def test_a_range_answered_with_the_whole_file_is_cut_to_the_range(fake: Callable[..., FakeService]) -> None:
    """A proxy that drops ``Range`` answers 200 with the whole file: the client skips to the range."""
    content = bytes(range(256)) * 40

    def whole_file(_: str) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(content) + content

    store = ServiceStore(f"lattice://127.0.0.1:{fake(whole_file).port}/job", token="t")
    with store.open_range(1, "data.safetensors", 1000, 500) as f:
        assert f.read() == content[1000:1500]


def test_a_body_cut_off_midway_is_a_transient_error_not_a_short_file(fake: Callable[..., FakeService]) -> None:
    def hang_up(_: str) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + bytes(5000)

    store = ServiceStore(f"lattice://127.0.0.1:{fake(hang_up).port}/job", token="t")
    got = b""
    with pytest.raises(TransientStoreError, match="cut off"), store.open_file(1, "data.safetensors") as f:
        while chunk := f.read(4096):
            got += chunk
    assert len(got) == 5000
