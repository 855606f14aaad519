"""The checkpoint service's HTTP API (aiohttp): auth, routes, streaming uploads, atomic commit.

The API is contract A of issue 6 (``docs/service-openapi.yaml``). A file upload streams to a
hidden part file in blocks written by a thread of its own with a running crc32c (receive.py; never held whole
in memory), is fsynced, checked against ``X-Lattice-Crc32c``, then moved into the step's
upload directory. The manifest, sent last, commits: every file it lists must have arrived
with the same size and crc32c; then the directory is renamed to ``step-N`` in one step. Each
job has an ``asyncio.Lock`` serialising its commits, deletes and retention; uploads run
concurrently and only touch shared state in short sections without an ``await``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hmac
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web

from lattice.core import fmt

from . import names
from .layout import JobDir, ServiceRoot
from .receive import PartWriter, receive, widen_reads

log = logging.getLogger("lattice")
MAX_MANIFEST = 16 << 20
CRC_HEADER = "X-Lattice-Crc32c"
_CRC_RE = re.compile(r"[0-9a-f]{8}")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """Answered as ``status`` with the JSON body ``{"error": message, **extra}``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def _fail(status: int, message: str, **kw: Any) -> NoReturn:
    raise ApiError(status, message, **kw)


@dataclasses.dataclass
class Pending:
    """Verified files of one (job, step) waiting for their manifest."""

    dir: Path
    files: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # name -> (size, crc)
    committing: bool = False
    touched: float = dataclasses.field(default_factory=time.monotonic)  # last file arrival


@dataclasses.dataclass
class ServiceConfig:
    """What ``lattice checkpoint-service serve`` was started with."""

    root: Path
    token: str
    max_file_size: int = 64 << 30
    abandon_after: float = 86400.0  # seconds without a new file before an upload is dropped


class Service:
    """The service's state (root, pending uploads, per-job locks) and its request handlers."""

    def __init__(self, config: ServiceConfig, root: ServiceRoot) -> None:
        self.config = config
        self.root = root
        self.pending: dict[tuple[str, int], Pending] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._expected = f"Bearer {config.token}".encode()

    def lock(self, job: str) -> asyncio.Lock:
        """The lock serialising commits, deletes and retention of ``job``."""
        return self._locks.setdefault(job, asyncio.Lock())

    # -- middlewares ------------------------------------------------------------------------
    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Turn every error into a JSON body; an unexpected exception is logged and answered 500."""
        try:
            return await handler(request)
        except ApiError as exc:
            return web.json_response({"error": exc.message, **exc.extra}, status=exc.status)
        except names.NameError_ as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
            return web.json_response({"error": exc.text or exc.reason}, status=exc.status, headers=allow)
        except ConnectionError as exc:  # the client went away mid-request: the answer goes nowhere
            log.info("%s %s: the client went away (%s); its upload was discarded",
                     request.method, request.path, exc)
            return web.json_response({"error": f"connection lost: {exc}"}, status=400)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                log.exception("checkpoint service: %s %s failed", request.method, request.path)
                return web.json_response({"error": "internal error (see the service log)"}, status=500)
            log.error("checkpoint service: %s is full (%s %s)", self.root.path, request.method, request.path)
            return web.json_response({"error": f"the service's disk is full ({exc.strerror}); "
                                               "free space or delete old checkpoints"}, status=507)
        except Exception:
            log.exception("checkpoint service: %s %s failed", request.method, request.path)
            return web.json_response({"error": "internal error (see the service log)"}, status=500)

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every route but ``GET /v1/health`` needs ``Authorization: Bearer <token>`` (constant-time check)."""
        if request.path != "/v1/health":
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self._expected):
                _fail(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
        names.check_path_segments(request.raw_path)
        return await handler(request)

    # -- routes ------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """``GET /v1/health``: the process is up."""
        return web.json_response({"status": "ok"})

    async def list_jobs(self, request: web.Request) -> web.Response:
        """``GET /v1/jobs``: job directories under the root."""
        return web.json_response({"jobs": await asyncio.to_thread(self.root.jobs)})

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        """``GET /v1/jobs/{job}/checkpoints``: committed checkpoints, newest first."""
        jd = self.root.job(names.check_job(request.match_info["job"]))

        def read() -> list[dict[str, Any]]:
            out = [jd.summary(step, path) for step, path in jd.committed()]
            return [s for s in out if s is not None]

        return web.json_response({"checkpoints": await asyncio.to_thread(read)})

    async def put_file(self, request: web.Request) -> web.Response:
        """``PUT .../checkpoints/{step}/files/{file}``: stream one file to disk, verify, keep it pending."""
        job, step, jd = self._job_step(request)
        name = names.check_file(request.match_info["file"])
        length = _content_length(request)
        crc_text = request.headers.get(CRC_HEADER, "")
        if not _CRC_RE.fullmatch(crc_text):
            _fail(400, f"header {CRC_HEADER} must be the body's crc32c as 8 lowercase hex digits, "
                       f"got {crc_text!r}")
        if length > self.config.max_file_size:
            _fail(413, f"file {name!r} is {length} bytes; this service accepts at most "
                       f"{self.config.max_file_size} (--max-file-size)")
        self._refuse_if_committed(job, step, jd)
        widen_reads(request.transport)
        writer = await asyncio.to_thread(lambda: PartWriter(jd.new_part(step)))
        try:
            await receive(request, writer)
            if writer.size != length:
                _fail(400, f"body ended after {writer.size} of {length} bytes")
            await asyncio.to_thread(writer.finish)
            if writer.crc != int(crc_text, 16):
                _fail(400, f"crc32c of the body is {writer.crc:08x}, but {CRC_HEADER} says {crc_text}; "
                           "the upload was discarded, send the file again")
            # from here to the rename: no await, so a commit or delete cannot interleave
            self._refuse_if_committed(job, step, jd)
            pending = self._pending(job, step, jd)
            writer.path.rename(pending.dir / name)
            pending.files[name] = (writer.size, writer.crc)
            pending.touched = time.monotonic()
        finally:
            writer.abort()  # no-op for the file once renamed
        return web.json_response({"size": writer.size, "crc32c": f"{writer.crc:08x}"}, status=201)

    async def put_manifest(self, request: web.Request) -> web.Response:
        """``PUT .../checkpoints/{step}/manifest[?keep=K]``: check every file, then commit atomically."""
        job, step, jd = self._job_step(request)
        keep = _keep(request)
        if _content_length(request) > MAX_MANIFEST:
            _fail(413, f"a manifest may be at most {MAX_MANIFEST} bytes")
        raw = await request.read()
        doc = _parse_manifest(raw, step)
        async with self.lock(job):
            self._refuse_if_committed(job, step, jd)
            have = self.pending[(job, step)].files if (job, step) in self.pending else {}
            missing = sorted(n for n in doc["files"] if n not in have)
            mismatch = sorted(n for n, info in doc["files"].items()
                              if n in have and have[n] != (info["size"], info["crc32c"]))
            if missing or mismatch:
                _fail(409, f"step {step} of job {job!r} cannot commit: {len(missing)} file(s) missing, "
                           f"{len(mismatch)} with another size or crc32c than the manifest says",
                      missing=missing, mismatch=mismatch)
            pending = self._pending(job, step, jd)
            pending.committing = True
            try:
                await asyncio.to_thread(jd.commit, pending.dir, step, raw, set(doc["files"]))
            finally:
                pending.committing = False
            self.pending.pop((job, step), None)
            deleted = await asyncio.to_thread(jd.retain, keep) if keep else []
        size = sum(f["size"] for f in doc["files"].values())
        log.info("committed job %s step %d: %d files, %d bytes%s", job, step, len(doc["files"]), size,
                 f"; retention (keep={keep}) deleted steps {deleted}" if deleted else "")
        return web.json_response({"step": step, "files": len(doc["files"]), "size": size,
                                  "deleted": deleted}, status=201)

    async def get_manifest(self, request: web.Request) -> web.Response:
        """``GET .../checkpoints/{step}/manifest``: the committed manifest's bytes."""
        job, step, jd = self._job_step(request)
        path = jd.committed_dir(step)
        try:
            if path is None or not self.root.inside(path / fmt.MANIFEST, jd.path):
                raise FileNotFoundError
            body = await asyncio.to_thread((path / fmt.MANIFEST).read_bytes)
        except FileNotFoundError:
            _fail(404, f"job {job!r} has no committed checkpoint of step {step}")
        return web.Response(body=body, content_type="application/json")

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        """``GET .../checkpoints/{step}/files/{file}``: stream a committed file (``Range`` -> 206)."""
        job, step, jd = self._job_step(request)
        name = names.check_file(request.match_info["file"])
        path = jd.committed_dir(step)
        if path is None:
            _fail(404, f"job {job!r} has no committed checkpoint of step {step}")
        crc = await asyncio.to_thread(jd.file_crc, step, name)
        target = path / name
        if crc is None or not target.is_file() or not self.root.inside(target, jd.path):
            _fail(404, f"committed checkpoint {step} of job {job!r} has no file {name!r}")
        return _file_response(target, crc)

    async def get_pending_file(self, request: web.Request) -> web.StreamResponse:
        """``GET .../checkpoints/{step}/pending/{file}``: a verified file of a not yet committed upload
        (ranks on several hosts read each other's part declarations before rank 0 commits)."""
        job, step, _ = self._job_step(request)
        name = names.check_file(request.match_info["file"])
        pending = self.pending.get((job, step))
        entry = pending.files.get(name) if pending is not None and not pending.committing else None
        if entry is None or not (pending.dir / name).is_file():  # entry is None whenever pending is
            _fail(404, f"job {job!r} has no pending upload of step {step} with file {name!r}")
        return _file_response(pending.dir / name, entry[1])

    async def delete_step(self, request: web.Request) -> web.Response:
        """``DELETE .../checkpoints/{step}``: drop a committed checkpoint and/or a pending upload."""
        job, step, jd = self._job_step(request)
        async with self.lock(job):
            pending = self.pending.pop((job, step), None)
            if pending is not None:
                await asyncio.to_thread(shutil.rmtree, pending.dir, True)
            found = await asyncio.to_thread(jd.delete_committed, step)
        if not (found or pending):
            _fail(404, f"job {job!r} has no committed checkpoint or upload of step {step}")
        log.info("deleted job %s step %d%s", job, step, " (committed)" if found else " (upload)")
        return web.Response(status=204)

    async def drop_abandoned(self) -> list[tuple[str, int]]:
        """Delete uploads that got no file for ``abandon_after`` seconds (a writer that died)."""
        now, dropped = time.monotonic(), []
        for (job, step), pending in list(self.pending.items()):
            if now - pending.touched < self.config.abandon_after or pending.committing:
                continue
            async with self.lock(job):
                if self.pending.get((job, step)) is pending:
                    del self.pending[(job, step)]
                    await asyncio.to_thread(shutil.rmtree, pending.dir, True)
                    dropped.append((job, step))
                    log.warning("dropped the upload of job %s step %d: no file for %.0f s and no manifest",
                                job, step, now - pending.touched)
        return dropped

    async def janitor(self) -> None:
        """Run :meth:`drop_abandoned` periodically until cancelled."""
        while True:
            await asyncio.sleep(min(60.0, max(0.2, self.config.abandon_after / 4)))
            await self.drop_abandoned()

    # -- helpers -----------------------------------------------------------------------------
    def _job_step(self, request: web.Request) -> tuple[str, int, JobDir]:
        job = names.check_job(request.match_info["job"])
        step = names.check_step(request.match_info["step"])
        return job, step, self.root.job(job)

    def _refuse_if_committed(self, job: str, step: int, jd: JobDir) -> None:
        pending = self.pending.get((job, step))
        if jd.committed_dir(step) is not None or (pending is not None and pending.committing):
            _fail(409, f"step {step} of job {job!r} is already committed; delete it first or use a new step",
                  committed=True)

    def _pending(self, job: str, step: int, jd: JobDir) -> Pending:
        pending = self.pending.get((job, step))
        if pending is None or not pending.dir.is_dir():
            pending = self.pending[(job, step)] = Pending(jd.new_upload_dir(step))
        return pending


def _content_length(request: web.Request) -> int:
    if request.content_length is None:
        _fail(411, "Content-Length is required (the body is streamed to disk and checked against it)")
    return request.content_length


def _file_response(path: Path, crc: int) -> web.FileResponse:
    """Stream ``path`` (``Range`` -> 206) with its crc32c in the header the client checks."""
    return web.FileResponse(path, headers={CRC_HEADER: f"{crc:08x}", "Content-Type": "application/octet-stream"})


def _keep(request: web.Request) -> int | None:
    text = request.query.get("keep")
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        _fail(400, f"keep={text!r}: must be an integer >= 1 (the number of newest checkpoints to keep)")
    return int(text)


def _parse_manifest(raw: bytes, step: int) -> dict[str, Any]:
    try:
        doc = fmt.parse_manifest(raw)
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors too
        _fail(400, f"the manifest is not a valid Lattice manifest: {exc}")
    if type(doc["step"]) is not int or doc["step"] != step:
        _fail(400, f"the manifest is for step {doc['step']!r}, but the URL says step {step}")
    for name, info in doc["files"].items():
        names.check_file(name)
        if info["size"] < 0:
            _fail(400, f"the manifest gives file {name!r} a negative size")
    return doc


def create_app(config: ServiceConfig, root: ServiceRoot) -> web.Application:
    """The aiohttp application serving ``root`` (already opened) under ``config``."""
    svc = Service(config, root)
    app = web.Application(middlewares=[svc.errors, svc.auth], client_max_size=MAX_MANIFEST)
    app["service"] = svc

    async def run_janitor(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(svc.janitor())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(run_janitor)
    base = "/v1/jobs/{job}/checkpoints/{step}"
    app.add_routes([
        web.get("/v1/health", svc.health),
        web.get("/v1/jobs", svc.list_jobs),
        web.get("/v1/jobs/{job}/checkpoints", svc.list_checkpoints),
        web.put(base + "/files/{file}", svc.put_file),
        web.get(base + "/files/{file}", svc.get_file),
        web.get(base + "/pending/{file}", svc.get_pending_file),
        web.put(base + "/manifest", svc.put_manifest),
        web.get(base + "/manifest", svc.get_manifest),
        web.delete(base, svc.delete_step),
    ])
    return app
