"""Crash consistency: a child process checkpoints in a loop and is SIGKILLed at random
moments (seeded). After every kill a fresh in-process session restores the directory and
must find a committed checkpoint holding exactly that step's values, no older than the
last step the child saw committed; no torn checkpoint may exist, and the killed writer's
temporary files must be cleaned up by the next session.

Trials per test run back to back on one directory, so each child also resumes from what
the previous one left behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lattice
from lattice.core import fmt, inspect
from lattice.core.storage import CORRUPT_TAG, TMP_TAG, TRASH_TAG

HELPER = Path(__file__).resolve().parent / "helpers" / "crash_child.py"
_spec = importlib.util.spec_from_file_location("crash_child", HELPER)
assert _spec is not None and _spec.loader is not None
crash_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash_child)

KEEP = 2


def start_child(d: Path, mode: str, use_torch: bool, out: Path, err: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(HELPER), str(d), mode, "--keep", str(KEEP), "--max-seconds", "30"]
    if use_torch:
        args.append("--torch")
    with open(out, "wb") as o, open(err, "wb") as e:
        return subprocess.Popen(args, stdout=o, stderr=e, start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def complete_lines(path: Path) -> list[str]:
    text = path.read_text()
    return text.split("\n")[:-1]  # the last piece is empty or was cut by the kill


def wait_for_start(proc: subprocess.Popen[bytes], out: Path, err: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith("start ") for line in complete_lines(out)):
        if proc.poll() is not None:
            pytest.fail(f"child exited with {proc.returncode} before starting: {err.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"child did not start within {timeout}s: {err.read_text()}")
        time.sleep(0.005)


def placeholders(use_torch: bool, in_place: bool) -> dict[str, Any]:
    """What the restoring session registers: matching arrays (read into in place) or None."""
    objs = crash_child.state_at(0, use_torch)
    if not in_place:
        for name, value in objs.items():
            if isinstance(value, np.ndarray):
                objs[name] = None
        objs["meta"] = {}
    else:
        for value in objs.values():
            if isinstance(value, np.ndarray):
                value[...] = 123  # not any step's values
    return objs


def assert_values_of_step(state: lattice.State, step: int, use_torch: bool) -> None:
    for name, want in crash_child.state_at(step, use_torch).items():
        got = getattr(state, name)
        if isinstance(want, dict):
            assert got == want, f"{name} restored from step {step}: {got} != {want}"
        elif isinstance(want, np.ndarray):
            assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want), f"{name} does not hold the values of step {step}"
        else:
            import torch

            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
            assert torch.equal(got, want), f"{name} does not hold the values of step {step}"


def run_trials(tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, use_torch: bool, trials: int,
               seed: str) -> dict[str, int]:
    rng = random.Random(seed)
    d = tmp_path / "ckpt"
    prev = 0
    stats = {"leftovers": 0, "advanced": 0, "killed_before_start": 0}
    for trial in range(trials):
        out, err = tmp_path / f"out{trial}.txt", tmp_path / f"err{trial}.txt"
        proc = start_child(d, mode, use_torch, out, err)
        try:
            if rng.random() < 0.15:  # any moment: importing, restoring, cleaning up, checkpointing
                time.sleep(rng.uniform(0.0, 0.4))
            else:  # somewhere in the checkpoint loop
                wait_for_start(proc, out, err)
                time.sleep(rng.uniform(0.0, 0.35))
            assert proc.poll() is None, f"child exited early ({proc.returncode}): {err.read_text()}"
        finally:
            kill_group(proc)
        assert proc.returncode == -signal.SIGKILL, err.read_text()

        lines = complete_lines(out)
        starts = [int(line.split()[1]) for line in lines if line.startswith("start ")]
        committed = [int(line.split()[1]) for line in lines if line.startswith("c ")]
        if starts:
            assert starts == [prev], f"child resumed from {starts}, expected step {prev}"
        else:
            stats["killed_before_start"] += 1
        assert committed == sorted(committed)

        # nothing committed may be torn: every committed checkpoint verifies in full
        for _, path in inspect.listing(d).committed if d.exists() else []:
            inspect.verify(path, progress=False)
            assert fmt.parse_manifest((path / fmt.MANIFEST).read_bytes())["step"] == fmt.parse_step_dirname(path.name)
        leftovers = [n for n in os.listdir(d) if TMP_TAG in n or TRASH_TAG in n] if d.exists() else []
        stats["leftovers"] += bool(leftovers)

        caplog.clear()
        in_place = trial % 2 == 0
        s = lattice.new_session(checkpoint_dir=str(d), every_steps=None, capture_rng=False, keep=KEEP)
        try:
            # the killed writer's temporary files are gone (its pid is dead: we reaped it)
            assert not [n for n in os.listdir(d) if TMP_TAG in n or TRASH_TAG in n], os.listdir(d)
            state = s.register(placeholders(use_torch, in_place))
            restored = state.step
            assert restored >= prev, "a later session restored an older step than an earlier one"
            if committed:
                assert restored >= committed[-1], f"step {committed[-1]} was committed but {restored} was restored"
            if restored == 0:
                assert s.restored is None and not committed
            else:
                assert s.restored is not None and s.restored.path.name == fmt.step_dirname(restored)
                assert_values_of_step(state, restored, use_torch)
        finally:
            s.close()
        damaged = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not damaged, [r.getMessage() for r in damaged]
        names = os.listdir(d)
        assert not [n for n in names if CORRUPT_TAG in n], names
        assert len(inspect.listing(d).committed) <= KEEP + 1  # retention runs right after a commit
        stats["advanced"] += restored > prev
        prev = restored
    return stats


CASES = [  # (mode, torch child, trials): 36 kills in all, numpy-only children for most
    ("step-wait", False, 8),
    ("explicit", False, 8),
    ("step-async", False, 8),
    ("nowait", False, 8),
    ("step-wait", True, 2),
    ("nowait", True, 2),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("mode", "use_torch", "trials"), CASES,
                         ids=[f"{m}-{'torch' if t else 'numpy'}" for m, t, _ in CASES])
def test_sigkill_at_random_moments(tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str,
                                   use_torch: bool, trials: int) -> None:
    if use_torch:
        pytest.importorskip("torch")
    caplog.set_level(logging.INFO, logger="lattice")
    stats = run_trials(tmp_path, caplog, mode, use_torch, trials, seed=f"{mode}-{use_torch}")
    assert stats["advanced"] >= 1, stats  # the children did get checkpoints committed


@pytest.mark.timeout(60)
def test_leftovers_of_a_killed_writer_are_cleaned_up(tmp_path: Path) -> None:
    """Kill a child while it is persisting: its temporary directory stays behind, and the
    next session removes it since its pid is dead. (The child is frozen with SIGSTOP until
    a temporary directory is seen, so the kill lands while it exists.)"""
    d = tmp_path / "ckpt"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    proc = start_child(d, "step-async", False, out, err)
    try:
        wait_for_start(proc, out, err)
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            os.killpg(proc.pid, signal.SIGSTOP)
            if any(TMP_TAG in n and n.startswith(fmt.STEP_PREFIX) for n in os.listdir(d)):
                break
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.002)
    finally:
        kill_group(proc)
    tmp_dirs = [n for n in os.listdir(d) if TMP_TAG in n and n.startswith(fmt.STEP_PREFIX)]
    assert tmp_dirs, "the kill should have left the writer's temporary directory behind"
    assert all(f"-{proc.pid}-" in n for n in tmp_dirs)
    s = lattice.new_session(checkpoint_dir=str(d), every_steps=None, capture_rng=False)
    try:
        assert not [n for n in os.listdir(d) if TMP_TAG in n or TRASH_TAG in n]
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_checkpoint_in_flight_at_normal_exit_is_committed(tmp_path: Path) -> None:
    """A child that never waits and simply exits: the checkpoint still persisting at exit is
    committed (``lattice.close`` runs at exit), not lost."""
    d = tmp_path / "ckpt"
    code = (
        "import numpy as np, lattice\n"
        f"lattice.configure(checkpoint_dir={str(d)!r}, every_steps=1, on_busy='wait')\n"
        "a = np.zeros(1 << 20, dtype=np.float32)\n"
        "lattice.register(a=a)\n"
        "for i in range(1, 6):\n"
        "    a[:] = i\n"
        "    lattice.step()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err.decode()
    assert b"failed" not in err, err.decode()
    assert [s for s, _ in inspect.listing(d).committed][0] == 5
    s = lattice.new_session(checkpoint_dir=str(d), every_steps=None, capture_rng=False)
    try:
        state = s.register({"a": None})
        assert state.step == 5 and np.array_equal(state.a, np.full(1 << 20, 5, dtype=np.float32))
    finally:
        s.close()
