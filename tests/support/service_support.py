"""Test support for the checkpoint service: a real service subprocess, a raw HTTP client
(``http.client``, which sends paths exactly as given: no ``..`` normalisation), and real
Lattice checkpoints to upload."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np

from lattice.core import fmt

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ServiceProc:
    """``lattice checkpoint-service serve`` in its own process group, on a free loopback port."""

    def __init__(self, root: Path, workdir: Path, *, max_file_size: str | None = None,
                 token: str = TOKEN, extra: list[str] | None = None, wrap: list[str] | None = None) -> None:
        self.root, self.workdir, self.token = root, workdir, token
        self.token_file = workdir / "token"
        self.token_file.write_text(token + "\n")
        self.token_file.chmod(0o600)
        self.max_file_size = max_file_size
        self.extra = extra or []
        self.wrap = wrap or []  # a command the service runs under (e.g. a private mount namespace)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "service.log"
        self.url = ""
        self.port = 0

    def start(self, timeout: float = 30) -> ServiceProc:
        argv = [sys.executable, "-m", "lattice.cli", "checkpoint-service", "serve", "--root", str(self.root),
                "--host", "127.0.0.1", "--port", "0", "--token-file", str(self.token_file),
                "--shutdown-timeout", "5"]
        if self.max_file_size:
            argv += ["--max-file-size", self.max_file_size]
        argv = self.wrap + argv + self.extra
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            for line in text.splitlines():
                if "listening on http://" in line:
                    self.url = line.split("listening on ", 1)[1].strip()
                    self.port = int(self.url.rsplit(":", 1)[1])
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"service did not start within {timeout}s:\n{self.log.read_text()}")

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` to the process group and wait (SIGKILL after 10 s); return the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, token: str | None = None) -> Client:
        return Client(self.port, self.token if token is None else token)


class Client:
    """One-request-per-connection HTTP client; ``token=""`` sends no Authorization header."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token

    def request(self, method: str, path: str, body: bytes | Any = None,
                headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, blocksize=1 << 20)
        try:
            hdrs = dict(headers or {})
            if self.token:
                hdrs.setdefault("Authorization", f"Bearer {self.token}")
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def put_file(self, job: str, step: int, name: str, data: bytes, crc: int | None = None) -> Reply:
        crc = crc32c.crc32c(data) if crc is None else crc
        return self.request("PUT", f"/v1/jobs/{job}/checkpoints/{step}/files/{name}", data,
                            {"X-Lattice-Crc32c": f"{crc:08x}", "Content-Length": str(len(data))})

    def put_manifest(self, job: str, step: int, manifest: bytes, keep: int | None = None) -> Reply:
        query = f"?keep={keep}" if keep is not None else ""
        return self.request("PUT", f"/v1/jobs/{job}/checkpoints/{step}/manifest{query}", manifest)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def steps(self, job: str) -> list[int]:
        reply = self.get(f"/v1/jobs/{job}/checkpoints")
        assert reply.status == 200, reply
        return [c["step"] for c in reply.json()["checkpoints"]]

    def upload_dir(self, job: str, step: int, ckpt: Path, keep: int | None = None) -> Reply:
        """Upload a local checkpoint directory as ``step``: files first, manifest last."""
        raw = manifest_for(ckpt, step)
        for name in json.loads(raw)["files"]:
            reply = self.put_file(job, step, name, (ckpt / name).read_bytes())
            assert reply.status == 201, reply
        return self.put_manifest(job, step, raw, keep)


def make_checkpoint(root: Path, nbytes: int = 1 << 16, seed: int = 0) -> Path:
    """A real committed Lattice checkpoint (numpy state of ``nbytes``) under ``root``; its directory."""
    import lattice

    s = lattice.new_session(checkpoint_dir=str(root), every_steps=None)
    try:
        s.register({"w": np.random.default_rng(seed).standard_normal(nbytes // 8)})
        s.step_done()
        s.checkpoint()
        s.wait()
    finally:
        s.close()
    return root / fmt.step_dirname(1)


def manifest_for(ckpt: Path, step: int) -> bytes:
    """The manifest of checkpoint ``ckpt`` rewritten for ``step`` (same files and items)."""
    doc = fmt.parse_manifest((ckpt / fmt.MANIFEST).read_bytes())
    extra = {k: v for k, v in doc.items()
             if k not in ("format", "version", "step", "wall_time", "files", "items", fmt.MANIFEST_CRC)}
    return fmt.manifest(step, doc["wall_time"], doc["files"], doc["items"], extra)


def manifest_of(files: dict[str, bytes], step: int) -> bytes:
    """A manifest listing ``files`` (name -> bytes) for ``step``."""
    info = {n: {"size": len(d), "crc32c": crc32c.crc32c(d)} for n, d in files.items()}
    return fmt.manifest(step, time.time(), info, {"w": "python"})
