"""Transparent mode: an unmodified script (tests/helpers/plain_train.py) under ``python -m
lattice.auto`` ends bit-identical to plain ``python``, with no failure and after three SIGKILLs
at random steps; ``LATTICE_AUTO=0`` installs nothing; ``lattice run --auto`` builds the command."""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import load_file  # noqa: E402

from lattice.adapters import torch_auto  # noqa: E402

SCRIPT = str(Path(__file__).parent / "helpers" / "plain_train.py")
EPOCHS, BATCHES = 5, 12  # 384 samples, batch 32


def same_bits(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(np.array_equal(x[k].view(np.uint8), y[k].view(np.uint8)) for k in x)


def auto_env(ckpt: Path, **extra: str) -> dict[str, str]:
    # on_busy=wait: every 5th step is checkpointed, none skipped while the previous one persists
    return {"LATTICE_CHECKPOINT_DIR": str(ckpt), "LATTICE_EVERY_STEPS": "5", "LATTICE_ON_BUSY": "wait", **extra}


def auto_argv(out: Path) -> list[str]:
    return [sys.executable, "-u", "-m", "lattice.auto", SCRIPT, str(out), str(EPOCHS)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run_command) -> Path:
    out = tmp_path_factory.mktemp("reference") / "final.safetensors"
    res = run_command([sys.executable, SCRIPT, str(out), str(EPOCHS)], timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\nepoch ") + 1 == EPOCHS * BATCHES
    return out


def run_until_killed(argv: list[str], env: dict[str, str], lines: int) -> tuple[list[str], str]:
    """Start ``argv`` in its own process group; SIGKILL the group once it printed ``lines`` lines."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, start_new_session=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        while len(seen) < lines:
            line = proc.stdout.readline()
            if not line:
                break  # finished (or died) before the kill
            seen.append(line)
        os.killpg(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
        return seen + rest.splitlines(keepends=True), err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.timeout(60)
def test_no_failure_is_bit_identical_and_auto_0_installs_nothing(tmp_path, reference, run_command) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "auto.safetensors"
    res = run_command(auto_argv(out), env=auto_env(ckpt), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "[lattice.auto] checkpointing loader0, optimizer0, module0, scheduler0" in res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr
    assert same_bits(out, reference)
    assert sorted(p.name for p in ckpt.glob("step-*"))[-1] == f"step-{EPOCHS * BATCHES:010d}"

    off_ckpt, off_out = tmp_path / "off", tmp_path / "off.safetensors"
    res = run_command(auto_argv(off_out), env=auto_env(off_ckpt, LATTICE_AUTO="0"), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "lattice.auto" not in res.stderr and not off_ckpt.exists()
    assert same_bits(off_out, reference)


@pytest.mark.timeout(90)
def test_three_sigkills_at_random_steps_resume_bit_identical(tmp_path, reference, run_command) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.safetensors"
    env = auto_env(ckpt, PLAIN_TRAIN_SLEEP="0.01")  # time for background checkpoints to commit
    rng = random.Random(1234)
    resumed = []
    for kill in range(3):
        lines, err = run_until_killed(auto_argv(out), env, rng.randint(8, 20))
        assert "done\n" not in lines, f"run {kill} finished before it was killed"
        resumed += re.findall(r"resuming at step (\d+) .* skips (\d+) completed", err)
    res = run_command(auto_argv(out), env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    resumed += re.findall(r"resuming at step (\d+) .* skips (\d+) completed", res.stderr)
    assert len(resumed) >= 3, resumed  # the first run may die before its first commit
    assert any(int(skipped) > 0 for _, skipped in resumed), resumed  # whole epochs were skipped
    steps = [int(s) for s, _ in resumed]
    assert steps == sorted(steps) and all(s % 5 == 0 for s in steps)
    assert res.stdout.count("epoch ") < EPOCHS * BATCHES  # the last run did not start over
    assert same_bits(out, reference), f"resumed at steps {steps}: final weights differ"


WARN_SCRIPT = """
import lattice.auto
import sys, torch
torch.manual_seed(0)
loader = torch.utils.data.DataLoader(torch.randn(8, 3), batch_size=4)
model = torch.nn.Linear(3, 1)
frozen = torch.nn.BatchNorm1d(3)       # has buffers, trained by no optimizer
bias = torch.zeros(1, requires_grad=True)  # trained, owned by no module
opt = torch.optim.SGD([*model.parameters(), bias], lr=0.1)
for epoch in range(2):
    for x in loader:
        opt.zero_grad(); (model(frozen(x)) + bias).sum().backward(); opt.step()
print('ok')
"""


@pytest.mark.timeout(60)
def test_import_lattice_auto_warns_once_about_what_it_cannot_capture(tmp_path, run_python) -> None:
    res = run_python(WARN_SCRIPT, env=auto_env(tmp_path / "ckpt"), timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert res.stderr.count("warning") == 1, res.stderr
    assert "1 trained tensor(s) belong to no module" in res.stderr and "BatchNorm1d" in res.stderr
    assert "loader0, optimizer0, module0, tensor0" in res.stderr
    assert (tmp_path / "ckpt" / "step-0000000000").exists() is False


@pytest.mark.timeout(20)
def test_install_is_once_and_uninstall_restores(tmp_path) -> None:
    originals = (torch.optim.Optimizer.__init__, torch.utils.data.DataLoader.__init__)
    assert not torch_auto.installed()
    try:
        ctl = torch_auto.install(lambda **kw: None)
        assert torch_auto.install(lambda **kw: None) is ctl
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        assert opt in ctl.known
        loader = torch.utils.data.DataLoader(list(range(4)))
        assert loader._lattice_position.auto is not None
    finally:
        torch_auto.uninstall()
    assert (torch.optim.Optimizer.__init__, torch.utils.data.DataLoader.__init__) == originals
    assert loader._lattice_position.auto is None
    assert not hasattr(torch.utils.data.DataLoader(list(range(4))), "_lattice_position")


@pytest.mark.timeout(20)
def test_trained_modules_finds_outermost_owners_in_parameter_order() -> None:
    head, body = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    loose = torch.zeros(2, requires_grad=True)
    idle = torch.nn.BatchNorm1d(2)
    opt = torch.optim.SGD([*head.parameters(), loose, *body.parameters()], lr=0.1)
    modules, tensors, untrained = torch_auto.trained_modules([opt])
    assert modules[0] is head and modules[1] is body and len(modules) == 2
    assert len(tensors) == 1 and tensors[0] is loose
    assert any(m is idle for m in untrained)


@pytest.mark.timeout(20)
def test_lattice_run_auto_builds_the_command() -> None:
    from lattice.core.errors import ConfigError
    from lattice.runtime.agent import cli

    p = argparse.ArgumentParser()
    cli._add_flags(p)
    cfg = cli.config_from_args(p.parse_args(["--auto", "train.py", "--lr", "1"]))
    assert cfg.auto and cfg.command[1:] == ["-u", "-m", "lattice.auto", "train.py", "--lr", "1"]
    cfg = cli.config_from_args(p.parse_args(["--auto", "-m", "pkg.train"]))
    assert cfg.command[1:] == ["-u", "-m", "lattice.auto", "-m", "pkg.train"]
    assert cli.config_from_args(p.parse_args(["train.py"])).command[1:] == ["-u", "train.py"]
    with pytest.raises(ConfigError, match="--no-python"):
        cli.config_from_args(p.parse_args(["--auto", "--no-python", "train.sh"]))


@pytest.mark.timeout(90)
def test_lattice_run_auto_end_to_end(tmp_path, reference, run_command) -> None:
    out = tmp_path / "final.safetensors"
    res = run_command([sys.executable, "-m", "lattice.cli", "run", "--auto", "--checkpoint-dir",
                       str(tmp_path / "ckpt"), SCRIPT, str(out), str(EPOCHS)],
                      env={"LATTICE_EVERY_STEPS": "5", "LATTICE_ON_BUSY": "wait"}, timeout=80, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert same_bits(out, reference)
    assert (tmp_path / "ckpt" / f"step-{EPOCHS * BATCHES:010d}").is_dir()
