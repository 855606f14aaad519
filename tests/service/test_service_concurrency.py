"""Concurrency: several jobs and several ranks per job upload at once; every checkpoint commits
whole and every byte comes back as sent."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from service_support import ServiceProc, manifest_of

pytestmark = pytest.mark.timeout(120)
JOBS, RANKS, STEPS = 4, 4, 3


def _files(job: int, step: int, rank: int) -> dict[str, bytes]:
    rng = random.Random(f"{job}/{step}/{rank}")
    return {f"rank-{rank}.safetensors": rng.randbytes(rng.randint(1, 600_000)),
            f"rank-{rank}.json": rng.randbytes(rng.randint(0, 2000))}


def test_jobs_and_ranks_upload_concurrently(service: ServiceProc) -> None:
    barriers = {j: threading.Barrier(RANKS, timeout=60) for j in range(JOBS)}
    results: dict[tuple[int, int], int] = {}

    def rank(job: int, r: int) -> None:
        c = service.client()
        for step in range(1, STEPS + 1):
            for name, data in _files(job, step, r).items():
                reply = c.put_file(f"job{job}", step, name, data)
                assert reply.status == 201, reply
            barriers[job].wait()  # every rank's files are in
            if r == 0:
                everything = {n: d for rr in range(RANKS) for n, d in _files(job, step, rr).items()}
                results[(job, step)] = c.put_manifest(f"job{job}", step, manifest_of(everything, step),
                                                      keep=2).status
            barriers[job].wait()

    with ThreadPoolExecutor(JOBS * RANKS) as pool:
        for f in [pool.submit(rank, j, r) for j in range(JOBS) for r in range(RANKS)]:
            f.result(timeout=100)
    assert set(results.values()) == {201}
    c = service.client()
    assert c.get("/v1/jobs").json()["jobs"] == [f"job{j}" for j in range(JOBS)]
    for j in range(JOBS):
        assert c.steps(f"job{j}") == [3, 2]
        for r in range(RANKS):
            for name, data in _files(j, 3, r).items():
                assert c.get(f"/v1/jobs/job{j}/checkpoints/3/files/{name}").body == data


def test_same_file_uploaded_twice_at_once_keeps_one_whole_copy(service: ServiceProc) -> None:
    a, b = b"A" * 3_000_000, b"B" * 3_000_000
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda d: service.client().put_file("j", 1, "x.bin", d), [a, b] * 4))
    assert {r.status for r in replies} == {201}
    c = service.client()
    winner = [d for d in (a, b) if c.put_manifest("j", 1, manifest_of({"x.bin": d}, 1)).status == 201]
    assert len(winner) == 1
    assert c.get("/v1/jobs/j/checkpoints/1/files/x.bin").body == winner[0]
