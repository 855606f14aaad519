"""``lattice ckpt ls|inspect|verify``: output, exit status, and errors that name the directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lattice.cli import main

BIN = Path(sys.executable).parent


@pytest.fixture
def ckpt(tmp_path: Path, make_session) -> Path:
    """A checkpoint directory with steps 2 and 4 (4 is the latest)."""
    root = tmp_path / "ckpt"
    s = make_session(checkpoint_dir=str(root), every_steps=None, keep=5)
    st = s.register({"weights": np.arange(12, dtype=np.float32).reshape(3, 4), "epoch": 0,
                     "vals": {"lr": 0.1, "ids": np.arange(3, dtype=np.int64)}})
    for _ in range(2):
        s.step_done()
        s.step_done()
        st.epoch += 1
        s.checkpoint()
        s.wait()
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.timeout(20)
def test_ls(ckpt: Path, capsys) -> None:
    rc, out, _ = run(capsys, "ckpt", "ls", str(ckpt))
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines[0].split()[0] == "STEP"
    assert lines[1].split()[0] == "4" and "(latest)" in lines[1]
    assert lines[2].split()[0] == "2" and "(latest)" not in lines[2]
    assert "weights" in lines[1] and "epoch" in lines[1] and "__rng__" not in out


@pytest.mark.timeout(20)
def test_ls_empty_and_bad_directory(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, _ = run(capsys, "ckpt", "ls", str(empty))
    assert rc == 0 and "no committed checkpoints" in out and str(empty) in out
    missing = tmp_path / "missing"
    rc, _, err = run(capsys, "ckpt", "ls", str(missing))
    assert rc == 2 and str(missing) in err and "not a directory" in err


@pytest.mark.timeout(20)
def test_inspect_text(ckpt: Path, capsys) -> None:
    rc, out, _ = run(capsys, "ckpt", "inspect", str(ckpt))
    assert rc == 0
    assert str(ckpt / "step-0000000004") in out and "step 4" in out
    head, rest = out.split("\n  items:\n")
    items, tensors = rest.split("\n  tensors:\n")
    assert "file data.safetensors" in head and "file tree.json" in head
    assert any(ln.split()[0] == "weights" and "python.value" in ln for ln in items.splitlines() if ln.strip())
    assert "weights" in tensors and "F32" in tensors and "[3, 4]" in tensors and "vals/ids" in tensors
    rc, out, _ = run(capsys, "ckpt", "inspect", str(ckpt), "2")
    assert rc == 0 and "step 2" in out


@pytest.mark.timeout(20)
def test_inspect_json(ckpt: Path, capsys) -> None:
    rc, out, _ = run(capsys, "ckpt", "inspect", str(ckpt), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["manifest"]["step"] == 4
    assert doc["items"]["weights"] == {"adapter": "python.value", "tensors": 1, "bytes": 48}
    assert doc["items"]["__rng__"]["adapter"] == "python.rng"
    assert doc["tensors"]["weights"]["shape"] == [3, 4]
    assert set(doc["manifest"]["files"]) >= {"data.safetensors", "tree.json"}


@pytest.mark.timeout(20)
def test_inspect_errors_name_directory_and_step(ckpt: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = run(capsys, "ckpt", "inspect", str(ckpt), "3")
    assert rc == 2 and "step 3" in err and str(ckpt) in err and "[4, 2]" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "ckpt", "inspect", str(empty))
    assert rc == 2 and str(empty) in err
    rc, _, err = run(capsys, "ckpt", "inspect", str(tmp_path / "nope"))
    assert rc == 2 and str(tmp_path / "nope") in err


@pytest.mark.timeout(20)
def test_verify_ok(ckpt: Path, capsys) -> None:
    rc, out, _ = run(capsys, "ckpt", "verify", str(ckpt))
    assert rc == 0
    assert "step 4: ok" in out and "step 2: ok" in out and "2 ok, 0 damaged" in out
    rc, out, _ = run(capsys, "ckpt", "verify", str(ckpt), "2")
    assert rc == 0 and "1 ok, 0 damaged" in out


@pytest.mark.timeout(20)
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_damaged_file(ckpt: Path, capsys, damage: str) -> None:
    data = ckpt / "step-0000000004" / "data.safetensors"
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0x40
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(bytes(raw[:-5]))
    else:
        data.unlink()
    rc, out, _ = run(capsys, "ckpt", "verify", str(ckpt))
    assert rc == 1
    assert "step 4: DAMAGED" in out and "data.safetensors" in out and "step 2: ok" in out
    assert "1 ok, 1 damaged" in out
    rc, _, _ = run(capsys, "ckpt", "verify", str(ckpt), "2")
    assert rc == 0
    rc, out, _ = run(capsys, "ckpt", "ls", str(ckpt))  # ls still lists (and flags what it can)
    assert rc == 0 and "2" in out


@pytest.mark.timeout(20)
def test_verify_no_checkpoints(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, _ = run(capsys, "ckpt", "verify", str(empty))
    assert rc == 2 and "no committed checkpoint" in out and str(empty) in out
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    rc, _, err = run(capsys, "ckpt", "verify", str(not_dir))
    assert rc == 2 and str(not_dir) in err


@pytest.mark.timeout(60)
def test_cli_in_subprocesses(ckpt: Path, tmp_path: Path, run_python, run_command) -> None:
    res = run_python(["-m", "lattice.cli", "ckpt", "ls", str(ckpt)], timeout=30)
    assert res.returncode == 0, res.stderr
    assert "(latest)" in res.stdout
    script = BIN / "lattice"
    if not script.exists():  # pragma: no cover - the dev install always has it
        pytest.skip("the `lattice` console script is not installed in this environment")
    res = run_command([str(script), "ckpt", "verify", str(ckpt)], timeout=30)
    assert res.returncode == 0 and "2 ok, 0 damaged" in res.stdout, res.stderr
    missing = tmp_path / "missing"
    res = run_command([str(script), "ckpt", "verify", str(missing)], timeout=30)
    assert res.returncode == 2 and str(missing) in res.stderr and res.stderr.startswith("lattice: error:")
