"""Fuzzing the live service: schemathesis against docs/service-openapi.yaml (valid and malformed
requests; every answer documented, conforming to its schema, and never a 5xx), plus hypothesis
sending arbitrary raw path segments and headers. Bounded to run in well under 30 s."""

from __future__ import annotations

import socket
import string
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from service_support import REPO, TOKEN, Client, ServiceProc

pytestmark = pytest.mark.timeout(120)
SPEC = REPO / "docs" / "service-openapi.yaml"
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    work = tmp_path_factory.mktemp("fuzz")
    svc = ServiceProc(work / "root", work, max_file_size="1M").start()
    yield svc
    svc.kill()
    assert "Traceback" not in svc.logs(), svc.logs()[-3000:]


def _schema() -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_path(str(SPEC))


def _alive(svc: ServiceProc) -> None:
    assert svc.proc is not None and svc.proc.poll() is None, "the service died"
    assert Client(svc.port, "").get("/v1/health").status == 200


def test_valid_requests_get_documented_answers(live: ServiceProc) -> None:
    @FUZZ
    @given(case=_schema().as_strategy(schemathesis.GenerationMode.POSITIVE))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=live.url, headers={"Authorization": f"Bearer {TOKEN}"},
                               checks=CHECKS)

    run()
    _alive(live)


def test_malformed_requests_get_4xx_never_5xx(live: ServiceProc) -> None:
    @FUZZ
    @given(case=_schema().as_strategy(schemathesis.GenerationMode.NEGATIVE))
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=live.url, headers={"Authorization": f"Bearer {TOKEN}"},
                                          checks=[not_a_server_error, negative_data_rejection])
        assert response.status_code < 500

    run()
    _alive(live)


_SEGMENT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", ".", "%2e%2e", "%2E.", ".hidden", "a%2Fb", "%00", "manifest.json", "9" * 11,
                     "-1", "%2f", "~", "a" * 300, "%C0%AE%C0%AE", "..%5C..", "step-0000000001"]),
    st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=20),
)
_TEMPLATES = ["/v1/jobs/{a}/checkpoints", "/v1/jobs/{a}/checkpoints/{b}",
              "/v1/jobs/{a}/checkpoints/{b}/manifest", "/v1/jobs/{a}/checkpoints/{b}/files/{c}",
              "/v1/{a}", "/{a}/jobs"]


def _raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
    """Send one request over a socket exactly as written; return the status code."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_arbitrary_path_segments_and_headers_never_give_5xx(live: ServiceProc) -> None:
    @FUZZ
    @given(template=st.sampled_from(_TEMPLATES), parts=st.tuples(_SEGMENT, _SEGMENT, _SEGMENT),
           method=st.sampled_from(["GET", "PUT", "DELETE", "HEAD", "POST"]),
           crc=st.one_of(st.none(), st.text(alphabet="0123456789abcdefABCDEF xyz", max_size=10)),
           rng=st.one_of(st.none(), st.sampled_from(["bytes=0-1", "bytes=-5", "bytes=9-1", "bytes=x",
                                                     "items=0-1", "bytes=0-1,3-4"])),
           body=st.binary(max_size=64))
    def run(template: str, parts: tuple[str, str, str], method: str, crc: str | None,
            rng: str | None, body: bytes) -> None:
        a, b, c = (quote(p, safe="%.~-_") for p in parts)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if crc is not None:
            headers["X-Lattice-Crc32c"] = crc
        if rng is not None:
            headers["Range"] = rng
        status = _raw_request(live.port, method, template.format(a=a, b=b, c=c), headers, body)
        assert status < 500, (method, template, parts)

    run()
    _alive(live)
    # nothing escaped the root: every entry under it is a job directory or the lock file
    root: Path = live.root
    assert all(p.name == ".lattice-service.lock" or p.is_dir() for p in root.iterdir())
