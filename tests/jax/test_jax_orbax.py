"""orbax interop with the real orbax library, both ways: ``lattice ckpt export --format orbax`` is
read back by ``StandardCheckpointer`` / ``PyTreeCheckpointer`` (with and without a target pytree),
``lattice ckpt import --format orbax`` reads single checkpoints and ``CheckpointManager``
directories, and ``restore_orbax`` loads an orbax checkpoint straight into registered pytrees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402

import lattice.cli  # noqa: E402
from lattice.interop.orbax import restore_orbax  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


def params(v: float) -> dict[str, Any]:
    return {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3) * v, "bias": jnp.full(3, v, jnp.bfloat16)}}


def opt_state(v: float) -> Any:
    p = params(v)
    _, state = TX.update(p, TX.init(p), p)  # count 1, non-zero moments
    return state


def model(seed: int) -> nnx.Linear:
    return nnx.Linear(3, 2, rngs=nnx.Rngs(seed))


def tree(v: float) -> dict[str, Any]:
    return {"params": params(v), "opt_state": opt_state(v), "key": jax.random.key(int(v)),
            "raw": jax.random.PRNGKey(int(v)), "epoch": int(v)}


def leaves_equal(a: Any, b: Any) -> bool:
    def host(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(host(x).dtype == host(y).dtype and host(x).tobytes() == host(y).tobytes()
                                      for x, y in zip(la, lb, strict=True))


def write_lattice(path: Path, objects: dict[str, Any], step: int) -> None:
    s = lattice.new_session(checkpoint_dir=str(path))
    try:
        s.register(objects)
        s.step = step
        s.checkpoint()
        s.wait()
    finally:
        s.close()


@pytest.mark.timeout(120)
def test_export_is_read_back_by_orbax_standard_restore(tmp_path: Path) -> None:
    m = model(3)
    write_lattice(tmp_path / "ckpt", {**tree(3.0), "model": m}, step=12)
    out = tmp_path / "orbax"
    assert lattice.cli.main(["ckpt", "export", "--format", "orbax", str(tmp_path / "ckpt"), str(out)]) == 0

    plain = ocp.StandardCheckpointer().restore(out)  # no target: nested dicts and lists
    assert set(plain) == {"params", "opt_state", "key", "raw", "epoch", "model"}
    assert leaves_equal(plain["params"], params(3.0)) and plain["epoch"] == 3
    assert plain["opt_state"][0] is None and int(plain["opt_state"][1][0]["count"]) == 1

    target = {**tree(0.0), "model": nnx.state(model(0))}
    restored = ocp.StandardCheckpointer().restore(out, target)  # the same pytree, types included
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    assert isinstance(restored["opt_state"][1][0], optax.ScaleByAdamState)
    assert leaves_equal({k: v for k, v in restored.items() if k != "model"}, tree(3.0))
    assert leaves_equal(restored["model"], nnx.state(m))
    assert str(jax.random.key_impl(restored["key"])) == "threefry2x32"
    assert leaves_equal(ocp.PyTreeCheckpointer().restore(out)["params"], params(3.0))


def test_export_reports_what_orbax_cannot_store(tmp_path: Path) -> None:
    write_lattice(tmp_path / "ckpt", {"params": {"w": jnp.ones(2), "empty": jnp.zeros((0, 3))}, "name": "run-1"}, 1)
    from lattice.interop.orbax import export_orbax

    skipped = export_orbax(tmp_path / "ckpt", tmp_path / "orbax")
    assert sorted(s.split(" ")[0] for s in skipped) == ["name", "params/empty"]
    got = ocp.StandardCheckpointer().restore(tmp_path / "orbax")
    assert set(got) == {"params"} and set(got["params"]) == {"w"}
    with pytest.raises(lattice.ConfigError, match="already exists"):
        export_orbax(tmp_path / "ckpt", tmp_path / "orbax")


@pytest.mark.timeout(120)
def test_import_of_a_checkpoint_manager_directory_restores_into_registered_pytrees(tmp_path: Path) -> None:
    root = tmp_path / "orbax"
    with ocp.CheckpointManager(root) as mngr:
        for step, v in ((10, 1.0), (20, 2.0)):
            mngr.save(step, args=ocp.args.StandardSave({"params": params(v), "opt_state": opt_state(v),
                                                        "key": jax.random.key(int(v))}))
        mngr.wait_until_finished()
    assert lattice.cli.main(["ckpt", "import", "--format", "orbax", str(root), str(tmp_path / "a")]) == 0
    assert lattice.cli.main(["ckpt", "import", "--format", "orbax", str(root), str(tmp_path / "b"), "--step", "10"]) == 0
    for d, step, v in (("a", 20, 2.0), ("b", 10, 1.0)):
        s = lattice.new_session(checkpoint_dir=str(tmp_path / d))
        try:
            state = s.register({"params": params(0.0), "opt_state": opt_state(0.0), "key": jax.random.key(0)})
            assert state.step == step
            assert leaves_equal(state.params, params(v)) and leaves_equal(state.opt_state, opt_state(v))
            assert leaves_equal(state.key, jax.random.key(int(v)))
            assert isinstance(state.opt_state[1][0], optax.ScaleByAdamState)
        finally:
            s.close()


def test_restore_orbax_loads_straight_into_registered_objects(tmp_path: Path, make_session) -> None:
    m = model(4)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "full", {"params": params(4.0), "model": nnx.state(m)})
        ckptr.save(tmp_path / "bare", params(5.0))
        ckptr.wait_until_finished()
    s = make_session(checkpoint_dir=str(tmp_path / "lattice"), restore=False)
    live = model(0)
    state = s.register({"params": params(0.0), "model": live})
    assert sorted(restore_orbax(tmp_path / "full", session=s)) == ["model", "params"]
    assert leaves_equal(state.params, params(4.0)) and state.model is live
    assert leaves_equal(nnx.state(live), nnx.state(m))
    assert restore_orbax(tmp_path / "bare", item="params", session=s) == ["params"]
    assert leaves_equal(state.params, params(5.0))
    with pytest.raises(lattice.ConfigError, match="no registered JAX item"):
        restore_orbax(tmp_path / "bare", session=s)
