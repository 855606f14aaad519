"""End to end on a real S3 endpoint (moto's standalone server): train a torch model with
``checkpoint_dir="s3://..."``, restore after the server restarted, and a SIGKILLed uploader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from storage_support import free_port, make_bucket, moto, s3_env

import lattice
from lattice.core import fmt
from lattice.core.stores import open_store

CHILD = Path(__file__).with_name("upload_child.py")


def _set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def _train(model, opt, steps: int) -> None:  # noqa: ANN001
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        lattice.step()


@pytest.mark.timeout(120)
def test_torch_checkpoints_on_s3_restore_after_the_s3_server_restarts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its state in memory; its recorder logs every request so a restarted server
    # can replay them (POST /moto-api/recorder/replay-recording) and hold the same objects
    rec = {"MOTO_ENABLE_RECORDING": "1", "MOTO_RECORDER_FILEPATH": str(tmp_path / "moto.rec")}
    server = moto(port, rec, tmp_path / "moto.log").start()
    try:
        _set_env(monkeypatch, {**s3_env(endpoint), "LATTICE_STAGING_DIR": str(tmp_path / "stage1")})
        url = f"s3://{make_bucket(endpoint)}/job"
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        lattice.configure(checkpoint_dir=url, every_steps=5, keep=2, on_busy="wait")
        lattice.register(model=model, optimizer=opt)
        _train(model, opt, 12)
        lattice.checkpoint()
        assert lattice.wait() == tmp_path / "stage1" / fmt.step_dirname(12)  # wait() covers the upload
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        lattice.close()
        assert open_store(url).list_committed() == [12, 10]

        server.stop()
        server = moto(port, rec, tmp_path / "moto.log").start()
        assert open_store(url).list_committed() == []  # a restarted moto has lost everything ...
        req = urllib.request.Request(f"{endpoint}/moto-api/recorder/replay-recording", method="POST")
        urllib.request.urlopen(req, timeout=60).close()
        assert open_store(url).list_committed() == [12, 10]  # ... until the recording is replayed

        monkeypatch.setenv("LATTICE_STAGING_DIR", str(tmp_path / "stage2"))  # nothing local: it must come from S3
        torch.manual_seed(99)
        model2 = torch.nn.Linear(8, 4)
        opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
        lattice.configure(checkpoint_dir=url, every_steps=5, keep=2)
        state = lattice.register(model=model2, optimizer=opt2)
        assert state.step == 12
        assert state.restored_from == str(tmp_path / "stage2" / fmt.step_dirname(12))
        for k, v in model2.state_dict().items():
            assert torch.equal(v, expected[k]), k
        assert opt2.state_dict()["state"][0]["step"] == 12
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_a_sigkilled_uploader_never_leaves_a_committed_step_and_the_upload_resumes(
        moto_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**s3_env(moto_server), "LATTICE_STAGING_DIR": str(tmp_path / "stage")}
    _set_env(monkeypatch, env)
    url = f"s3://{make_bucket(moto_server)}/job"
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, str(CHILD), url, str(marker)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never reached the middle of the upload"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # between two files of step 2's upload
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    store = open_store(url)
    assert store.list_committed() == [1]
    assert store.fs.find(f"{store.root}/{fmt.step_dirname(2)}")  # part of step 2 did land
    assert len(json.loads(marker.read_text())["uploaded"]) == 1  # one of its two files, no manifest

    # a new process finds step 2 committed in staging but not in S3: it restores it and uploads it
    a = np.zeros(1000)
    s = lattice.new_session(checkpoint_dir=url, every_steps=None)
    try:
        s.register({"a": a})
        assert s.step == 2 and a[0] == 1.0
        s.wait()
        assert store.list_committed() == [2, 1]
    finally:
        s.close()
