"""Fixtures of the checkpoint-service tests: a real service subprocess per test, killed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_support import ServiceProc


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProc]]:
    """``start_service(root=..., max_file_size=...)``: start a service; every one is killed at the end."""
    started: list[ServiceProc] = []

    def start(root: Path | None = None, **kw: object) -> ServiceProc:
        work = tmp_path / f"svc{len(started)}"
        work.mkdir()
        svc = ServiceProc(root or tmp_path / "root", work, **kw).start()  # type: ignore[arg-type]
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.kill()


@pytest.fixture
def service(start_service: Callable[..., ServiceProc]) -> ServiceProc:
    """A running service with root ``tmp_path/root`` and a 8 MiB file limit."""
    return start_service(max_file_size="8M")
