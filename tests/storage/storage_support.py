"""Helpers shared by the storage tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lattice.core import fmt
from lattice.core.stores.base import Store

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class Server:
    """A subprocess in its own process group, SIGKILLed (the whole group) by ``stop``."""

    def __init__(self, argv: list[str], health: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.argv, self.health, self.env, self.log = argv, health, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out, env={**os.environ, **(self.env or {})},
                                     start_new_session=True)
        _wait_http(self.health, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)


def moto(port: int, env: dict[str, str] | None = None, log: Path | None = None) -> Server:
    """moto's standalone S3 server on 127.0.0.1:``port`` (not started yet)."""
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Server(argv, f"http://127.0.0.1:{port}/moto-api/", env, log)


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment pointing s3fs at ``endpoint`` with dummy credentials."""
    return {**AWS_ENV, "LATTICE_STORAGE_OPTIONS": json.dumps({"client_kwargs": {"endpoint_url": endpoint}})}


def make_bucket(endpoint: str) -> str:
    import s3fs

    name = f"b-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(name)
    return name


@dataclasses.dataclass
class Backend:
    """One store under test plus a way to damage what it holds (as a disk or bucket fault would)."""

    name: str
    url: str
    store: Store
    overwrite: Callable[[int, str, bytes], None]  # (step, file, new bytes) behind the store's back


def make_checkpoint(root: Path, step: int, payload: bytes | None = None, tree: bytes = b'{"items": {}}') -> Path:
    """A committed local checkpoint ``root/step-N`` (files + manifest); the store does not care what the bytes mean."""
    import crc32c

    path = root / fmt.step_dirname(step)
    path.mkdir(parents=True)
    data = payload if payload is not None else os.urandom(64 << 10) + step.to_bytes(8, "little")
    files: dict[str, dict[str, Any]] = {}
    for name, raw in ((fmt.DATA, data), (fmt.TREE, tree)):
        (path / name).write_bytes(raw)
        files[name] = {"size": len(raw), "crc32c": crc32c.crc32c(raw)}
    (path / fmt.MANIFEST).write_bytes(fmt.manifest(step, time.time(), files, {}))
    return path
