"""Sharded JAX arrays on a 4-device CPU mesh (in a subprocess, since the device count is fixed at
JAX's import): a checkpoint of values handed over with ``state.params = ...`` restores with the
registered shardings and devices (row/column-sharded, replicated, on one device, uncommitted,
sharded typed keys), also onto a different sharding than the one saved."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

SCRIPT = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import lattice

ckpt = sys.argv[1]
mesh = jax.make_mesh((2, 2), ("data", "model"))
assert len(jax.devices()) == 4

def build(v, spec=P("data", "model")):
    return {
        "w": jax.device_put(jnp.arange(32.0).reshape(8, 4) * v, NamedSharding(mesh, spec)),
        "b": jax.device_put(jnp.arange(4, dtype=jnp.bfloat16) * v, NamedSharding(mesh, P())),
        "c": jax.device_put(jnp.arange(6, dtype=jnp.int32) * int(v), jax.devices()[3]),
        "u": jnp.arange(3.0) * v,
        "k": jax.device_put(jax.random.split(jax.random.key(int(v)), 4), NamedSharding(mesh, P("data"))),
    }

def check(got, want, like):
    for name in want:
        g, w, l = got[name], want[name], like[name]
        assert g.sharding == l.sharding, (name, g.sharding, l.sharding)
        assert g._committed == l._committed, (name, g._committed, l._committed)
        if name == "k":
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w)), name

s = lattice.new_session(checkpoint_dir=ckpt)
state = s.register({"params": build(1.0)})
state.params = build(2.0)  # the new value is what the checkpoint holds
s.checkpoint(); s.wait(); s.close()

like = build(0.0)
s = lattice.new_session(checkpoint_dir=ckpt)
got = s.register({"params": like}).params
check(got, build(2.0), like)
s.close()

like = build(0.0, P("model", "data"))  # restore onto another sharding than was saved
s = lattice.new_session(checkpoint_dir=ckpt)
got = s.register({"params": like}).params
check(got, build(2.0), like)
assert got["w"].sharding.spec == P("model", "data")
s.close()
print("sharding ok")
'''


@pytest.mark.timeout(120)
def test_restore_gives_the_registered_shardings_and_devices(tmp_path, run_python) -> None:
    res = run_python([ "-c", SCRIPT, str(tmp_path / "ckpt")], timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sharding ok" in res.stdout
