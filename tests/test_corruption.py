"""Corruption: bit flips (in the safetensors length, header and tensor data, in tree.json
and manifest.json), truncation, deletion, empty files and garbage manifests are all
detected; restore falls back to the previous committed checkpoint, logs which file is
damaged and why, sets the damaged checkpoint aside, and never deletes anything when no
checkpoint is usable. ``lattice ckpt verify`` reports the same damage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lattice
import lattice.cli
from lattice.core import fmt
from lattice.core.errors import CorruptCheckpointError
from lattice.core.restore import restore_from
from lattice.core.storage import CORRUPT_TAG, TMP_TAG

STEPS = (1, 2, 3)
NEWEST, PREVIOUS = STEPS[-1], STEPS[-2]


def values_at(step: int) -> dict[str, Any]:
    return {
        "w": np.arange(4096, dtype=np.float32) * step + 0.25,
        "ids": np.arange(300, dtype=np.int64) - step,
        "mask": np.arange(77) % (step + 1) == 0,
        "meta": {"step": step, "name": f"run-{step}", "lr": 0.1 / (step + 1)},
    }


def write_checkpoints(d: Path) -> None:
    s = lattice.new_session(checkpoint_dir=str(d), every_steps=None, keep=len(STEPS), capture_rng=False)
    try:
        objs = values_at(0)
        s.register(objs)
        for step in STEPS:
            for name, value in values_at(step).items():
                if isinstance(value, dict):
                    objs[name].clear()
                    objs[name].update(value)
                else:
                    objs[name][...] = value
            s.step_done()
            s.checkpoint()
            assert s.wait() == d / fmt.step_dirname(step)
    finally:
        s.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("template") / "ckpt"
    write_checkpoints(d)
    return d


@pytest.fixture
def ckpt(template: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(template, d)
    return d


def placeholders(in_place: bool) -> dict[str, Any]:
    if in_place:  # registered arrays of the right shape: the data is read straight into them
        return {k: (np.full_like(v, 7) if isinstance(v, np.ndarray) else {}) for k, v in values_at(0).items()}
    return {"w": None, "ids": None, "mask": None, "meta": None}


def restore(d: Path, in_place: bool = True) -> lattice.Session:
    s = lattice.new_session(checkpoint_dir=str(d), every_steps=None, capture_rng=False)
    try:
        s.register(placeholders(in_place))
    except BaseException:
        s.close()
        raise
    return s


def assert_values(s: lattice.Session, step: int) -> None:
    assert s.step == step
    for name, want in values_at(step).items():
        got = s.items[name].obj
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), f"{name} is not step {step}'s"
        else:
            assert got == want


def snapshot_tree(d: Path) -> dict[str, str]:
    """Every file and directory under ``d`` with a digest of its contents."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d)] = "dir"
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, d)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def data_header_end(path: Path) -> int:
    raw = path.read_bytes()
    return 8 + struct.unpack("<Q", raw[:8])[0]


def flip_bit(path: Path, offset: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


# -- damage kinds: (file, kind) -> a function damaging that file, and the reason expected --
ANY_DATA_REASON = r"crc32c mismatch|bad header|wrong size|no valid (entry|data_offsets)|overlap|ends early"


def damage(path: Path, kind: str, rng: random.Random) -> None:
    size = path.stat().st_size
    if kind == "flip-length":
        flip_bit(path, rng.randrange(8), rng.randrange(8))
    elif kind == "flip-header":
        flip_bit(path, rng.randrange(8, data_header_end(path)), rng.randrange(8))
    elif kind == "flip-data":
        flip_bit(path, rng.randrange(data_header_end(path), size), rng.randrange(8))
    elif kind == "flip":
        flip_bit(path, rng.randrange(size), rng.randrange(8))
    elif kind == "truncate":
        os.truncate(path, rng.randrange(1, size))
    elif kind == "truncate-header":
        os.truncate(path, rng.randrange(1, data_header_end(path)))
    elif kind == "empty":
        os.truncate(path, 0)
    elif kind == "append":
        with open(path, "ab") as f:
            f.write(b"\0" * rng.randrange(1, 100))
    elif kind == "delete":
        path.unlink()
    elif kind == "garbage-json":
        path.write_text(json.dumps({"format": "something-else", "step": NEWEST}))
    elif kind == "not-json":
        path.write_bytes(b"\x00garbage{]")
    else:
        raise AssertionError(kind)


CASES: list[tuple[str, str, str, int]] = [  # file, damage, expected reason, seed
    *[(fmt.DATA, "flip-length", ANY_DATA_REASON, seed) for seed in range(3)],
    *[(fmt.DATA, "flip-header", ANY_DATA_REASON, seed) for seed in range(4)],
    *[(fmt.DATA, "flip-data", "crc32c mismatch", seed) for seed in range(4)],
    *[(fmt.DATA, "truncate", "is truncated", seed) for seed in range(2)],
    (fmt.DATA, "truncate-header", "is truncated", 0),
    (fmt.DATA, "empty", "is truncated", 0),
    (fmt.DATA, "append", "longer than written", 0),
    (fmt.DATA, "delete", "is missing", 0),
    *[(fmt.TREE, "flip", "crc32c mismatch", seed) for seed in range(3)],
    (fmt.TREE, "truncate", "is truncated", 0),
    (fmt.TREE, "empty", "is truncated", 0),
    (fmt.TREE, "delete", "is missing", 0),
    *[(fmt.MANIFEST, "flip", "not a valid manifest", seed) for seed in range(4)],
    (fmt.MANIFEST, "truncate", "not a valid manifest", 0),
    (fmt.MANIFEST, "empty", "not a valid manifest", 0),
    (fmt.MANIFEST, "garbage-json", "not a valid manifest", 0),
    (fmt.MANIFEST, "not-json", "not a valid manifest", 0),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("file", "kind", "reason", "seed"), CASES,
                         ids=[f"{f}-{k}-{s}" for f, k, _, s in CASES])
def test_damaged_newest_falls_back_to_previous(ckpt: Path, caplog: pytest.LogCaptureFixture,
                                               capsys: pytest.CaptureFixture[str],
                                               file: str, kind: str, reason: str, seed: int) -> None:
    rng = random.Random(f"{file}-{kind}-{seed}")
    newest = ckpt / fmt.step_dirname(NEWEST)
    damage(newest / file, kind, rng)

    assert lattice.cli.main(["ckpt", "verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"step {NEWEST}: DAMAGED: .*{re.escape(file)}: [^\n]*({reason})", out), out
    assert f"step {PREVIOUS}: ok" in out and "2 ok, 1 damaged" in out

    caplog.set_level(logging.WARNING, logger="lattice")
    s = restore(ckpt, in_place=seed % 2 == 0)
    try:
        assert_values(s, PREVIOUS)
        assert s.restored is not None and s.restored.path == ckpt / fmt.step_dirname(PREVIOUS)
    finally:
        s.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unusable = [m for m in warnings if f"step {NEWEST} is unusable" in m]
    assert len(unusable) == 1, warnings
    assert re.search(rf"{re.escape(str(newest))}/{re.escape(file)}: [^\n]*({reason})", unusable[0]), unusable[0]
    # set aside: renamed out of the committed namespace, kept for inspection
    assert not newest.exists()
    aside = [n for n in os.listdir(ckpt) if n.startswith(newest.name + CORRUPT_TAG)]
    assert len(aside) == 1 and any("moved damaged checkpoint" in m and aside[0] in m for m in warnings)
    assert (ckpt / fmt.step_dirname(PREVIOUS)).is_dir() and (ckpt / fmt.step_dirname(STEPS[0])).is_dir()

    # the next restore goes straight to the previous checkpoint, without warnings
    caplog.clear()
    s = restore(ckpt)
    try:
        assert_values(s, PREVIOUS)
    finally:
        s.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.timeout(60)
def test_deleted_manifest_is_never_committed_and_skipped(ckpt: Path, caplog: pytest.LogCaptureFixture,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Without its manifest a step directory does not count as committed: restore skips it
    (with a warning naming the file) and leaves it where it is; ``verify`` flags it."""
    newest = ckpt / fmt.step_dirname(NEWEST)
    (newest / fmt.MANIFEST).unlink()
    assert lattice.cli.main(["ckpt", "verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"step {NEWEST}: DAMAGED: .*{fmt.MANIFEST} is missing", out), out
    caplog.set_level(logging.WARNING, logger="lattice")
    s = restore(ckpt)
    try:
        assert_values(s, PREVIOUS)
    finally:
        s.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(newest) in m and fmt.MANIFEST in m and "never committed" in m for m in warnings), warnings
    assert newest.is_dir() and sorted(os.listdir(newest)) == [fmt.DATA, fmt.TREE]


@pytest.mark.timeout(60)
def test_every_checkpoint_damaged_raises_and_deletes_nothing(ckpt: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(0)
    kinds = {STEPS[0]: (fmt.MANIFEST, "garbage-json"), STEPS[1]: (fmt.TREE, "flip"), STEPS[2]: (fmt.DATA, "flip-data")}
    for step, (file, kind) in kinds.items():
        damage(ckpt / fmt.step_dirname(step) / file, kind, rng)
    before = snapshot_tree(ckpt)
    with pytest.raises(lattice.CheckpointError) as info:
        restore(ckpt)
    assert not isinstance(info.value, lattice.CorruptCheckpointError)
    msg = str(info.value)
    for step, (file, _) in kinds.items():
        assert f"{ckpt / fmt.step_dirname(step)}/{file}" in msg, msg
    assert "Nothing was deleted" in msg
    assert snapshot_tree(ckpt) == before  # nothing deleted, renamed or rewritten

    assert lattice.cli.main(["ckpt", "verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "0 ok, 3 damaged" in out
    for step, (file, _) in kinds.items():
        assert re.search(rf"step {step}: DAMAGED: .*{re.escape(file)}", out), out


@pytest.mark.timeout(60)
def test_verify_passes_on_healthy_checkpoints(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert lattice.cli.main(["ckpt", "verify", str(ckpt)]) == 0
    assert "3 ok, 0 damaged" in capsys.readouterr().out


# -- every single-bit flip in the small files is detected -----------------------------
def _all_flips_detected(path: Path, file: str, begin: int, end: int) -> None:
    """Flip each bit of ``file`` in [begin, end) in turn; restore_from must raise
    CorruptCheckpointError for that file every time (never load, never another error)."""
    target = path / file
    original = target.read_bytes()
    items = lattice.new_session(checkpoint_dir=str(path.parent / "unused"), every_steps=None,
                                capture_rng=False, restore=False)
    try:
        items.register(placeholders(in_place=False))
        raw = bytearray(original)
        for offset in range(begin, end):
            for bit in range(8):
                raw[offset] ^= 1 << bit
                target.write_bytes(raw)
                with pytest.raises(CorruptCheckpointError) as info:
                    restore_from(path, items.items)
                assert info.value.file == file, (offset, bit, str(info.value))
                raw[offset] ^= 1 << bit
    finally:
        items.close()
        target.write_bytes(original)
    restore_from(path, items.items)  # intact again


@pytest.mark.timeout(120)
def test_every_bit_flip_in_manifest_is_detected(ckpt: Path) -> None:
    path = ckpt / fmt.step_dirname(NEWEST)
    _all_flips_detected(path, fmt.MANIFEST, 0, (path / fmt.MANIFEST).stat().st_size)


@pytest.mark.timeout(120)
def test_every_bit_flip_in_safetensors_header_is_detected(ckpt: Path) -> None:
    path = ckpt / fmt.step_dirname(NEWEST)
    _all_flips_detected(path, fmt.DATA, 0, data_header_end(path / fmt.DATA))


@pytest.mark.timeout(60)
def test_flip_turning_offsets_into_a_float_is_detected(ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``"data_offsets":[0,16384]`` -> ``[0.16384]``: one bit (',' -> '.'), still valid JSON."""
    data = ckpt / fmt.step_dirname(NEWEST) / fmt.DATA
    raw = data.read_bytes()
    comma = raw.index(b'"data_offsets":[') + len(b'"data_offsets":[')
    comma = raw.index(b",", comma)
    flip_bit(data, comma, 1)
    assert b'"data_offsets":[0.' in data.read_bytes()
    caplog.set_level(logging.WARNING, logger="lattice")
    s = restore(ckpt)
    try:
        assert_values(s, PREVIOUS)
    finally:
        s.close()
    assert any("data_offsets" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from([fmt.DATA, fmt.TREE, fmt.MANIFEST]), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7), step_idx=st.integers(0, len(STEPS) - 1))
def test_random_bit_flip_anywhere_falls_back(template: Path, tmp_path: Path, file: str, where: float,
                                             bit: int, step_idx: int) -> None:
    """A bit flip anywhere in any file of any checkpoint: the newest intact one is restored."""
    d = tmp_path / "flip"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(template, d)
    step = STEPS[step_idx]
    target = d / fmt.step_dirname(step) / file
    flip_bit(target, int(where * target.stat().st_size), bit)
    s = restore(d)
    try:
        want = NEWEST if step != NEWEST else PREVIOUS
        assert_values(s, want)
    finally:
        s.close()
    aside = [n for n in os.listdir(d) if CORRUPT_TAG in n]
    if step == NEWEST:
        assert len(aside) == 1 and aside[0].startswith(fmt.step_dirname(NEWEST) + CORRUPT_TAG)
    else:  # an older damaged checkpoint is not even looked at
        assert aside == []
    shutil.rmtree(d)


# -- uncommitted leftovers ------------------------------------------------------------
@pytest.fixture
def live_pid() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        yield proc.pid
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.pid


@pytest.mark.timeout(60)
def test_uncommitted_leftovers_are_ignored(ckpt: Path, live_pid: int, caplog: pytest.LogCaptureFixture) -> None:
    host = socket.gethostname().replace("-", "_")
    newest = ckpt / fmt.step_dirname(NEWEST)
    # complete copies of a newer checkpoint that were never committed (never renamed)
    dead_tmp = ckpt / f"{fmt.step_dirname(NEWEST + 1)}{TMP_TAG}{host}-{dead_pid()}-0badc0de"
    live_tmp = ckpt / f"{fmt.step_dirname(NEWEST + 2)}{TMP_TAG}{host}-{live_pid}-0badc0de"
    other_host = ckpt / f"{fmt.step_dirname(NEWEST + 3)}{TMP_TAG}elsewhere-{dead_pid()}-0badc0de"
    for tmp in (dead_tmp, live_tmp, other_host):
        shutil.copytree(newest, tmp)
    # a step directory without a manifest (data and tree only)
    no_manifest = ckpt / fmt.step_dirname(NEWEST + 4)
    shutil.copytree(newest, no_manifest)
    (no_manifest / fmt.MANIFEST).unlink()

    caplog.set_level(logging.INFO, logger="lattice")
    s = restore(ckpt, in_place=False)
    try:
        assert_values(s, NEWEST)
        assert s.restored is not None and s.restored.path == newest
    finally:
        s.close()
    names = os.listdir(ckpt)
    assert dead_tmp.name not in names  # its writer is dead: removed
    assert live_tmp.name in names and other_host.name in names  # not provably abandoned: kept
    assert no_manifest.name in names and not [n for n in names if CORRUPT_TAG in n]
    assert not [r for r in caplog.records if "unusable" in r.getMessage()]
