"""Backend-specific storage rules: object-store listing and cleanup, URL resolution and plugins, tiers."""

from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path

import pytest
from storage_support import make_checkpoint

from lattice.core import fmt
from lattice.core.errors import ConfigError
from lattice.core.ranks import Ranks
from lattice.core.stores import STORES, open_store, tiers, transfer
from lattice.core.stores.file import FileStore
from lattice.core.stores.fsspec_store import FsspecStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mem() -> FsspecStore:
    store = FsspecStore(f"memory://u-{time.monotonic_ns()}/job", stale_after=3600)
    yield store
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def test_a_manifest_that_does_not_parse_is_not_a_commit(mem: FsspecStore, tmp_path: Path) -> None:
    transfer.upload(make_checkpoint(tmp_path, 1), mem, 1)
    transfer.upload(make_checkpoint(tmp_path, 2), mem, 2)
    raw = mem.read_manifest(2)
    mem.fs.pipe_file(f"{mem.root}/{fmt.step_dirname(2)}/{fmt.MANIFEST}", raw[: len(raw) // 2])  # torn write
    assert mem.list_committed() == [1]


def test_cleanup_removes_only_abandoned_uploads_older_than_the_safety_age(mem: FsspecStore, tmp_path: Path) -> None:
    local = make_checkpoint(tmp_path, 5)
    info = fmt.parse_manifest((local / fmt.MANIFEST).read_bytes())["files"][fmt.DATA]
    mem.put_file(5, fmt.DATA, local / fmt.DATA, info["size"], info["crc32c"])
    transfer.upload(make_checkpoint(tmp_path, 4), mem, 4)
    assert mem.cleanup() == []  # fresh: may still be uploading
    mem.stale_after = 0.0
    removed = mem.cleanup()
    assert removed == [f"{mem.root}/{fmt.step_dirname(5)}/{fmt.DATA}"]
    assert mem.list_committed() == [4]  # committed steps are never cleaned


def test_plain_paths_and_file_urls_open_a_file_store(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), FileStore)
    store = open_store(tmp_path.as_uri())
    assert isinstance(store, FileStore) and store.local_root == tmp_path


def test_unknown_scheme_is_a_config_error_that_names_it() -> None:
    with pytest.raises(ConfigError, match="no storage backend for scheme 'nosuch'"):
        open_store("nosuch://x/y")


def test_a_scheme_from_the_lattice_storage_entry_point_group_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ep = metadata.EntryPoint("myscheme", "storage_plugin:factory", "lattice.storage")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "storage_plugin.py").write_text(
        "from lattice.core.stores.file import FileStore\n"
        "def factory(url):\n"
        "    return FileStore(url.replace('myscheme://', 'file://'))\n")
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [ep] if group == "lattice.storage" else [])
    monkeypatch.setattr(STORES, "_plugins_loaded", False)
    store = open_store(f"myscheme://{tmp_path}/ckpt")
    assert isinstance(store, FileStore) and store.local_root == tmp_path / "ckpt"


def test_service_url_without_token_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LATTICE_SERVICE_TOKEN", raising=False)
    monkeypatch.delenv("LATTICE_SERVICE_TOKEN_FILE", raising=False)
    with pytest.raises(ConfigError, match="LATTICE_SERVICE_TOKEN"):
        open_store("lattice://127.0.0.1:1/job")


def test_service_url_with_a_bad_job_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATTICE_SERVICE_TOKEN", "t")
    with pytest.raises(ConfigError, match="job name"):
        open_store("lattice://127.0.0.1:1/../etc")


def test_a_url_stages_locally_and_a_plain_path_does_not(tmp_path: Path) -> None:
    env = {"LATTICE_STAGING_DIR": str(tmp_path / "stage")}
    loc = tiers.resolve("memory://b/j", Ranks(), env)
    assert (loc.kind, loc.local, loc.upload) == ("staging", tmp_path / "stage", True)
    loc = tiers.resolve(str(tmp_path / "ck"), Ranks(), env)
    assert (loc.kind, loc.local, loc.store, loc.upload) == ("local", tmp_path / "ck", None, False)


def test_memory_dir_commits_there_and_never_uploads(tmp_path: Path) -> None:
    env = {"LATTICE_MEMORY_DIR": str(tmp_path / "shm"), "LATTICE_STAGING_DIR": str(tmp_path / "stage")}
    loc = tiers.resolve("memory://b/j", Ranks(), env)
    assert (loc.kind, loc.local, loc.staging, loc.upload) == ("memory", tmp_path / "shm", tmp_path / "stage", False)


def test_default_staging_is_per_url_under_shm_or_tmp() -> None:
    a, b = tiers.default_staging("s3://b/one"), tiers.default_staging("s3://b/two")
    assert a != b and a.parent == b.parent and a.parent.name.startswith("lattice-staging-")


def test_url_with_ranks_on_several_hosts_assembles_the_checkpoint_in_the_store(tmp_path: Path) -> None:
    loc = tiers.resolve("memory://b/j", Ranks(0, 4), {"LOCAL_WORLD_SIZE": "2"})
    assert loc.assemble and not loc.upload and loc.kind == "staging"  # stores/assemble.py, no upload after
    loc = tiers.resolve("memory://b/j", Ranks(0, 4), {"LOCAL_WORLD_SIZE": "2", "LATTICE_STAGING_DIR": str(tmp_path)})
    assert loc.assemble and loc.local == tmp_path
    one_host = tiers.resolve("memory://b/j", Ranks(0, 4), {"LOCAL_WORLD_SIZE": "4"})
    assert not one_host.assemble and one_host.upload


def test_a_host_local_checkpoint_dir_with_ranks_on_several_hosts_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # several agents on this machine: shared, no warning
    with caplog.at_level("WARNING", logger="lattice"):
        tiers.resolve(str(tmp_path / "ckpt"), Ranks(0, 4), {"LOCAL_WORLD_SIZE": "2"})
    assert "several hosts" not in caplog.text
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")  # rank 0 on another host
    with caplog.at_level("WARNING", logger="lattice"):
        tiers.resolve(str(tmp_path / "ckpt"), Ranks(0, 4), {"LOCAL_WORLD_SIZE": "2"})
    kind = tiers.fs_type(tmp_path)
    if kind in tiers.HOST_LOCAL_FS:
        assert "several hosts" in caplog.text and "no checkpoint commits" in caplog.text
    else:  # a network filesystem here: nothing to warn about
        assert "several hosts" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lattice"):
        tiers.resolve(str(tmp_path / "ckpt"), Ranks(0, 4), {"LOCAL_WORLD_SIZE": "4"})  # one host: fine
    assert "several hosts" not in caplog.text


def test_a_disabled_memory_dir_ignored_on_several_hosts_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / tiers.DISABLED).write_text("{}")
    env = {"LOCAL_WORLD_SIZE": "2", "LATTICE_MEMORY_DIR": str(tmp_path / "mem"), "LATTICE_STAGING_DIR": str(tmp_path)}
    loc = tiers.resolve("memory://b/j", Ranks(0, 4), env)
    assert loc.memory is None  # was Path("") (the working directory) before
    single = tiers.resolve("memory://b/j", Ranks(0, 4), {**env, "LOCAL_WORLD_SIZE": "4"})
    assert single.memory == tmp_path / "mem"  # one host: the disabled dir is still read at restore
