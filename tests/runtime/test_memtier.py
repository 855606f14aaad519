"""The agent's memory tier (lattice/runtime/agent/memtier.py) with real agents, workers and tmpfs:
a SIGKILLed worker comes back from /dev/shm without reading storage (proved by the kernel's inotify
and by the worker's own audit of its opens), a lost agent's job comes back from storage, a too-small
/dev/shm falls back to storage with a clear error (a real 64 MiB tmpfs where user namespaces allow,
and --memory-limit everywhere), and the replicator's upload, pruning, retry and rescue in process."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from agent_support import LATTICE, ROOT, Proc
from memtier_support import ReadWatch, cfg, commit, memory_root
from userns import can_mount_tmpfs

from lattice.core import inspect as ckpt
from lattice.core.errors import ConfigError
from lattice.runtime.agent import memtier
from lattice.runtime.agent.memtier import MemoryTier

WORKER = str(ROOT / "tests" / "helpers" / "memtier_worker.py")
START = re.compile(r"\[rank0\]: start step (\d+) from (\S+)")


def run_cmd(tmp: Path, job: str, *flags: str, worker: list[str]) -> list[str]:
    return [*LATTICE, "run", "--rdzv-id", job, "--checkpoint-dir", str(tmp / "ckpt"), "--no-spares", *flags,
            WORKER, "--out", str(tmp), *worker]


def opens(tmp: Path, pid_files: list[Path] | None = None) -> dict[str, list[str]]:
    """The files each worker process opened while restoring, by tier: {pid: ["memory /dev/...", ...]}."""
    return {f.stem.split("-")[1]: f.read_text().splitlines() for f in pid_files or sorted(tmp.glob("opens-*.txt"))}


def restore_opens(tmp: Path, restored_path: str) -> list[str]:
    """The open log of the worker that restored ``restored_path`` (the one that printed it)."""
    logs = [lines for lines in opens(tmp).values() if any(restored_path in ln for ln in lines)]
    assert len(logs) == 1, opens(tmp)
    return logs[0]


@pytest.mark.timeout(120)
def test_killed_worker_restores_from_memory_without_reading_storage(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    watch = ReadWatch(tmp_path / "ckpt")  # every read of a storage file by any process, from now on
    with memory_root() as root:
        p = Proc(run_cmd(tmp_path, "mt-kill", "--memory-root", str(root),
                         worker=["--steps", "30", "--every", "5", "--fail-at", "12", "--size-kb", "512"]), tmp_path)
        try:
            assert p.wait(100) == 0, p.text
        finally:
            p.kill()
        storage_reads = watch.since(0)
        watch.close()
        starts = START.findall(p.text)
        assert len(starts) == 2 and starts[0] == ("0", "None"), p.text
        step, path = starts[1]
        memdir = re.search(r"workers checkpoint into (\S+)", p.text).group(1)  # type: ignore[union-attr]
        assert path.startswith(memdir + "/") and step in ("5", "10"), p.text  # restored from the agent's memory
        assert storage_reads == [], f"storage files were read during the run: {storage_reads}"
        read = restore_opens(tmp_path, path)
        assert any(ln.startswith("memory ") and ln.endswith("data.safetensors") for ln in read), read
        assert not any(ln.startswith("storage ") for ln in read), read
        assert not Path(memdir).exists() and os.listdir(root) == []  # removed once everything was stored
    assert ckpt.listing(tmp_path / "ckpt").committed[0][0] == 30


@pytest.mark.timeout(150)
def test_lost_agent_restores_from_storage(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with memory_root() as root:
        flags = ("--memory-root", str(root))
        a = Proc(run_cmd(tmp_path, "mt-loss", *flags, worker=["--steps", "400", "--every", "5"]), tmp_path)
        try:
            a.wait_for(lambda ln: bool(re.search(r"memory tier: step (1\d|[2-9]\d|\d{3,}) uploaded", ln)), 60)
            a.kill()  # SIGKILL the agent; PDEATHSIG takes its worker: the node's memory is gone with it
        finally:
            a.kill()
        (dead,) = root.iterdir()
        stored = ckpt.listing(tmp_path / "ckpt").committed[0][0]
        in_memory = ckpt.listing(dead).committed[0][0]
        assert stored >= 10 and in_memory >= stored
        for path in dead.iterdir():  # a lost node takes its memory along: nothing to rescue
            if path.name.startswith("step-"):
                shutil.rmtree(path)
        watch = ReadWatch(tmp_path / "ckpt")
        b = Proc(run_cmd(tmp_path, "mt-loss", *flags, worker=["--steps", str(stored + 5), "--every", "5"]), tmp_path)
        try:
            assert b.wait(100) == 0, b.text
        finally:
            b.kill()
        reads = watch.since(0)
        watch.close()
        (step, path), = START.findall(b.text)
        assert path == str(tmp_path / "ckpt" / f"step-{int(step):010d}") and int(step) == stored, (b.text, in_memory)
        assert any(r.endswith("data.safetensors") for r in reads), reads  # the watch does see storage reads
        read = restore_opens(tmp_path, path)
        assert any(ln.startswith("storage ") and ln.endswith("data.safetensors") for ln in read), read
        assert "removed" in b.text and os.listdir(root) == []  # the dead agent's directory was cleaned up


@pytest.mark.timeout(120)
def test_memory_limit_too_small_falls_back_to_storage(tmp_path: Path) -> None:
    with memory_root() as root:
        p = Proc(run_cmd(tmp_path, "mt-small", "--memory-root", str(root), "--memory-limit", "3M",
                         worker=["--steps", "20", "--every", "5", "--size-kb", "2048", "--sleep", "0.2"]), tmp_path)
        try:
            assert p.wait(100) == 0, p.text
        finally:
            p.kill()
        errors = [ln for ln in p.lines if " ERROR " in ln and "too small for the memory tier" in ln]
        assert len(errors) == 1, p.text
        for part in ("needs room for 2 (4.0 MiB)", "can use only 3.0 MiB", "--shm-size=", "medium: Memory",
                     "sizeLimit:", "Falling back to the storage tier"):
            assert part in errors[0], errors[0]
        # only the checkpoint that revealed the size went through memory; later ones went straight to storage
        assert re.findall(r"memory tier: step (\d+) uploaded", p.text) == ["5"], p.text  # 1 s between checkpoints
        assert len(START.findall(p.text)) == 1, p.text  # and the fall back cost no restart
        assert os.listdir(root) == []
    assert [s for s, _ in ckpt.listing(tmp_path / "ckpt").committed][:1] == [20]


def run_with_64mib_shm(tmp_path: Path, job: str, size_kb: int, sleep: float) -> Proc:
    """``lattice run`` of 12 steps (checkpoint every 5) with a real 64 MiB tmpfs on /dev/shm, mounted
    in a private mount namespace; returns the finished process (it must exit 0)."""
    worker = ["--steps", "12", "--every", "5", "--size-kb", str(size_kb), "--sleep", str(sleep)]
    cmd = " ".join(run_cmd(tmp_path, job, worker=worker))
    p = Proc(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {cmd}"], tmp_path)
    try:
        assert p.wait(100) == 0, p.text
    finally:
        p.kill()
    return p


@pytest.mark.timeout(120)
@pytest.mark.skipif(not can_mount_tmpfs(), reason="cannot mount a private tmpfs here (needs user namespaces)")
def test_real_64mib_dev_shm_falls_back_to_storage(tmp_path: Path) -> None:
    """The container default: a 64 MiB /dev/shm (a real tmpfs, mounted in a private mount namespace)."""
    p = run_with_64mib_shm(tmp_path, "mt-64m", size_kb=40960, sleep=0.2)
    errors = [ln for ln in p.lines if " ERROR " in ln and "/dev/shm is too small" in ln]
    assert len(errors) == 1 and "needs room for 2 (80.0 MiB)" in errors[0] and "--shm-size=128m" in errors[0], p.text
    assert re.search(r"can use only 6\d\.\d MiB", errors[0]), errors[0]
    assert re.findall(r"memory tier: step (\d+) uploaded", p.text) == ["5"], p.text  # later ones: straight to storage
    assert len(START.findall(p.text)) == 1, p.text  # and the fall back cost no restart
    assert [s for s, _ in ckpt.listing(tmp_path / "ckpt").committed][:1] == [12]


@pytest.mark.timeout(120)
@pytest.mark.skipif(not can_mount_tmpfs(), reason="cannot mount a private tmpfs here (needs user namespaces)")
def test_a_first_checkpoint_bigger_than_dev_shm_goes_to_storage_without_failing(tmp_path: Path) -> None:
    """80 MiB of state, a 64 MiB /dev/shm: the worker sees it cannot fit before writing a byte there."""
    p = run_with_64mib_shm(tmp_path, "mt-big", size_kb=81920, sleep=0.1)
    assert any("does not fit in" in ln and "writing to the storage tier instead" in ln for ln in p.lines), p.text
    assert "memory tier: step" not in p.text  # nothing was uploaded from memory: it all went to storage
    assert len(START.findall(p.text)) == 1, p.text  # no checkpoint failed, no restart
    assert [s for s, _ in ckpt.listing(tmp_path / "ckpt").committed][:2] == [12, 10]


def test_cli_help_documents_the_memory_tier(run_python) -> None:
    out = run_python(["-m", "lattice.cli", "run", "--help"], timeout=60).stdout
    assert "--memory-tier {auto,on,off}" in out and "--memory-limit" in out and "/dev/shm" in out


# -- in process ------------------------------------------------------------------------------
def test_modes_sizes_and_messages(tmp_path: Path) -> None:
    assert memtier.parse_size("3M") == 3 << 20 and memtier.parse_size("2GiB") == 2 << 30
    assert memtier.parse_size("1048576") == 1 << 20 and memtier.parse_size("") is None
    with pytest.raises(ConfigError, match="--memory-limit"):
        memtier.parse_size("lots")
    assert memtier.resolve_mode(cfg(tmp_path, tmp_path, max_nodes=2)) == "off"
    with pytest.raises(ConfigError, match="single-agent"):
        memtier.resolve_mode(cfg(tmp_path, tmp_path, max_nodes=2, memory_tier="on"))
    assert memtier.resolve_mode(cfg(tmp_path, tmp_path / "absent")) == "off"
    with pytest.raises(ConfigError, match="--memory-root"):
        memtier.resolve_mode(cfg(tmp_path, tmp_path / "absent", memory_tier="on"))
    msg = memtier.too_small_message(Path("/dev/shm"), 1 << 30, 64 << 20)
    assert "needs room for 2 (2.0 GiB)" in msg and "--shm-size=3g" in msg and "sizeLimit: 3Gi" in msg


@pytest.mark.timeout(60)
def test_replicator_uploads_prunes_retries_and_keeps_what_is_not_stored(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("a file where the store's directory should be")  # storage broken
    with memory_root() as root:
        tier = MemoryTier(cfg(tmp_path, root))
        tier.start()
        tier._stop.set()  # drive the replicator by hand
        tier._thread.join(5)  # type: ignore[union-attr]
        assert tier.worker_env() == {"LATTICE_MEMORY_DIR": str(tier.dir)}
        commit(tier.dir, 5)  # type: ignore[arg-type]
        tier.tick()
        assert tier.uploaded == -1 and tier._retry_at > time.monotonic()  # failed: kept in memory, retried later
        (tmp_path / "ckpt").unlink()  # storage back
        tier._retry_at = 0.0
        for step in (10, 15):
            commit(tier.dir, step)  # type: ignore[arg-type]
        tier.tick()  # only the newest is uploaded; older ones in memory are pruned
        assert tier.uploaded == 15 and [s for s, _ in ckpt.listing(tmp_path / "ckpt").committed] == [15]
        assert [s for s, _ in ckpt.listing(tier.dir).committed] == [15]  # type: ignore[arg-type]
        commit(tier.dir, 20)  # type: ignore[arg-type]
        (tmp_path / "ckpt").rename(tmp_path / "away")
        (tmp_path / "ckpt").write_text("broken again")
        assert tier.close(timeout=1.5) is False and tier.dir.is_dir()  # type: ignore[union-attr]


@pytest.mark.timeout(60)
def test_next_agent_stores_what_a_dead_agent_left_in_memory(tmp_path: Path) -> None:
    with memory_root() as root:
        dead = MemoryTier(cfg(tmp_path, root, node="dead"))
        dead.start()
        dead._stop.set()
        dead._thread.join(5)  # type: ignore[union-attr]
        commit(dead.dir, 7)  # type: ignore[arg-type]
        os.close(dead._lock_fd)  # type: ignore[arg-type]  # the agent dies: its lock is released
        fresh = MemoryTier(cfg(tmp_path, root, node="fresh"))
        fresh.start()
        try:
            assert [s for s, _ in ckpt.listing(tmp_path / "ckpt").committed] == [7]
            assert not dead.dir.exists() and fresh.dir.is_dir()  # type: ignore[union-attr]
        finally:
            assert fresh.close(timeout=5)
        assert os.listdir(root) == []


@pytest.mark.timeout(60)
def test_a_dead_agent_of_another_job_with_the_same_name_is_never_stored_here(tmp_path: Path) -> None:
    """`lattice run` names every job "default": a leftover of one must not land in another's storage."""
    with memory_root() as root:
        other = MemoryTier(cfg(tmp_path, root, job="default", node="a", checkpoint_dir=str(tmp_path / "other")))
        other.start()
        other._stop.set()
        other._thread.join(5)  # type: ignore[union-attr]
        commit(other.dir, 10)  # type: ignore[arg-type]
        os.close(other._lock_fd)  # type: ignore[arg-type]  # that agent dies
        (tmp_path / "ckpt").mkdir()  # `lattice run` creates it
        mine = MemoryTier(cfg(tmp_path, root, job="default", node="b"))
        mine.start()
        try:
            assert ckpt.listing(tmp_path / "ckpt").committed == []
            assert other.dir.is_dir()  # left for the next agent of *its* job and storage
        finally:
            assert mine.close(timeout=5)
        shutil.rmtree(other.dir)


def test_live_agents_directory_is_left_alone(tmp_path: Path) -> None:
    with memory_root() as root:
        live = MemoryTier(cfg(tmp_path, root, node="live"))
        live.start()
        other = MemoryTier(cfg(tmp_path, root, node="other"))
        other.start()
        try:
            assert live.dir.is_dir() and other.dir.is_dir()  # type: ignore[union-attr]
        finally:
            assert other.close(timeout=5) and live.close(timeout=5)

