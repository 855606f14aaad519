"""``lattice.load_arrays`` reads a checkpoint's tensors as numpy in a process that does not import
the framework that wrote them (torch, JAX), checks every byte's checksum, and reads a multi-rank
checkpoint's shared and per-rank arrays."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lattice
from lattice.core import fmt
from lattice.interop.arrays import load_arrays

READ = r'''
import json, sys
import numpy as np
import lattice
arrays = lattice.load_arrays(sys.argv[1])
expect = np.load(sys.argv[2])
bad = [k for k in expect.files
       if arrays[k].shape != expect[k].shape or arrays[k].tobytes() != expect[k].tobytes()]
print(json.dumps({"names": sorted(arrays), "dtypes": {k: str(v.dtype) for k, v in arrays.items()}, "bad": bad,
                  "frameworks": [m for m in ("torch", "jax", "tensorflow") if m in sys.modules]}))
'''

WRITE_TORCH = r'''
import sys, numpy as np, torch, lattice
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).to(torch.bfloat16))
opt = torch.optim.Adam(model.parameters())
model[1](model[0](torch.ones(2, 3)).to(torch.bfloat16)).float().sum().backward()
opt.step()
s = lattice.new_session(checkpoint_dir=sys.argv[1])
s.register({"model": model, "opt": opt, "counts": torch.arange(5, dtype=torch.int64)})
s.checkpoint(); s.wait(); s.close()
def host(t):  # bfloat16 has no numpy type without ml_dtypes: compare its bits
    t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
expect = {f"model/{k}": host(v) for k, v in model.state_dict().items()}
expect["opt/state/0/exp_avg"] = host(opt.state_dict()["state"][0]["exp_avg"])
expect["counts"] = host(torch.arange(5, dtype=torch.int64))
np.savez(sys.argv[2], **expect)
'''

WRITE_JAX = r'''
import sys, numpy as np, jax, jax.numpy as jnp, lattice
tree = {"w": jnp.linspace(-2, 2, 6, dtype=jnp.bfloat16).reshape(2, 3), "q": jnp.arange(-4, 4, dtype=jnp.int4),
        "key": jax.random.key(5), "scalar": jnp.float32(1.5)}
s = lattice.new_session(checkpoint_dir=sys.argv[1])
s.register({"tree": tree}); s.checkpoint(); s.wait(); s.close()
np.savez(sys.argv[2], **{"tree/w": np.asarray(tree["w"]).view(np.int16), "tree/q": np.asarray(tree["q"]).view(np.int8),
                         "tree/key/key_data": np.asarray(jax.random.key_data(tree["key"])),
                         "tree/scalar": np.asarray(tree["scalar"])})
'''


def read_without_framework(run_python, ckpt: Path, expect: Path) -> dict:
    res = run_python(["-c", READ, str(ckpt), str(expect)], timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
def test_torch_checkpoint_is_read_without_importing_torch(tmp_path: Path, run_python) -> None:
    pytest.importorskip("torch")
    res = run_python(["-c", WRITE_TORCH, str(tmp_path / "ckpt"), str(tmp_path / "expect.npz")], timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    got = read_without_framework(run_python, tmp_path / "ckpt", tmp_path / "expect.npz")
    assert got["frameworks"] == []
    assert got["bad"] == []
    assert {"model/0.weight", "model/1.weight", "opt/state/0/exp_avg", "counts"} <= set(got["names"])
    assert got["dtypes"]["model/1.weight"] == "bfloat16" and got["dtypes"]["counts"] == "int64"
    assert not any(n.startswith("__") for n in got["names"])  # Lattice's own RNG items are left out


@pytest.mark.timeout(120)
def test_jax_checkpoint_is_read_without_importing_jax(tmp_path: Path, run_python) -> None:
    pytest.importorskip("jax")
    res = run_python(["-c", WRITE_JAX, str(tmp_path / "ckpt"), str(tmp_path / "expect.npz")], timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    got = read_without_framework(run_python, tmp_path / "ckpt", tmp_path / "expect.npz")
    assert got["frameworks"] == [] and got["bad"] == []
    assert got["dtypes"] == {"tree/w": "bfloat16", "tree/q": "int4", "tree/key/key_data": "uint32",
                             "tree/scalar": "float32"}


def test_a_damaged_data_file_is_refused(tmp_path: Path, make_session) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"x": np.arange(1000.0)})
    s.checkpoint()
    path = s.wait()
    assert np.array_equal(lattice.load_arrays(tmp_path, step=0)["x"], np.arange(1000.0))
    data = path / fmt.DATA
    raw = bytearray(data.read_bytes())
    raw[-10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(lattice.CorruptCheckpointError, match="crc32c"):
        lattice.load_arrays(tmp_path)
    with pytest.raises(lattice.ConfigError, match="no committed checkpoint of step 7"):
        lattice.load_arrays(tmp_path, step=7)


@pytest.mark.timeout(120)
def test_multi_rank_checkpoint_shared_and_per_rank_arrays(tmp_path: Path) -> None:
    child = str(Path(__file__).parents[1] / "helpers" / "rank_child.py")
    procs = [subprocess.Popen([sys.executable, child, "save", str(tmp_path)], start_new_session=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LATTICE_JOB": "la",
                                   "LATTICE_ROUND": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=90)
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    shared = lattice.load_arrays(tmp_path)
    assert list(shared) == ["shared"] and np.array_equal(shared["shared"], np.full(4, 7.0))
    r0, r1 = (load_arrays(tmp_path, rank=r, internal=True) for r in (0, 1))
    keys = "__rng__/numpy/keys"
    assert keys not in load_arrays(tmp_path, internal=True)  # per-rank state lives in the rank files
    assert r0[keys].shape == r1[keys].shape == (624,) and not np.array_equal(r0[keys], r1[keys])
    with pytest.raises(lattice.ConfigError, match="rank=2"):
        lattice.load_arrays(tmp_path, rank=2)
