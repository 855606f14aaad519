"""flax through Lattice: NNX modules, optimizers and Rngs are restored in place (``nnx.update``),
so training continues bit-identically, dropout stream included; linen variable collections
(``params`` + ``batch_stats``) round-trip as pytrees."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")
import flax.linen as linen  # noqa: E402
import jax.numpy as jnp  # noqa: E402


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.drop(nnx.relu(self.bn(self.fc(x)))))


def build(seed: int) -> tuple[Net, nnx.Optimizer]:
    model = Net(nnx.Rngs(params=seed, dropout=seed + 1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model: Net, opt: nnx.Optimizer, x: jax.Array) -> None:
    def loss(m: Net) -> jax.Array:
        return jnp.mean((m(x) - jnp.sum(x, axis=1, keepdims=True)) ** 2)

    opt.update(model, nnx.grad(loss)(model))


def step(model: Net, opt: nnx.Optimizer, i: int) -> None:
    train_step(model, opt, jax.random.normal(jax.random.key(i), (16, 4)))


def leaves(obj: object) -> list[np.ndarray]:
    out = []
    for leaf in jax.tree.leaves(nnx.state(obj)):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


def test_nnx_model_and_optimizer_resume_in_place_bit_identically(make_session, tmp_path) -> None:
    model, opt = build(0)
    for i in range(3):
        step(model, opt, i)
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"model": model, "optimizer": opt})
    assert s.items["model"].adapter.name == "jax.nnx" and s.items["optimizer"].adapter.name == "jax.nnx"
    s.checkpoint()
    s.wait()
    for i in range(3, 6):
        step(model, opt, i)

    model2, opt2 = build(5)  # other initial weights and dropout stream
    kernel = model2.fc.kernel
    state = make_session(checkpoint_dir=str(tmp_path)).register({"model": model2, "optimizer": opt2})
    assert state.model is model2 and state.optimizer is opt2  # restored in place
    assert model2.fc.kernel is kernel and int(opt2.step[...]) == 3
    for i in range(3, 6):
        step(model2, opt2, i)
    assert same(leaves(model2), leaves(model)) and same(leaves(opt2), leaves(opt))


def test_linen_variable_collections_round_trip(make_session, tmp_path) -> None:
    class CNN(linen.Module):
        @linen.compact
        def __call__(self, x: jax.Array, train: bool) -> jax.Array:
            x = linen.Dense(6)(x)
            return linen.BatchNorm(use_running_average=not train)(x)

    model = CNN()
    variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
    _, updates = model.apply(variables, jax.random.normal(jax.random.key(1), (5, 3)), train=True,
                             mutable=["batch_stats"])
    variables = {"params": variables["params"], **updates}
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"variables": variables})
    s.checkpoint()
    s.wait()
    fresh = model.init(jax.random.key(9), jnp.ones((2, 3)), train=False)
    state = make_session(checkpoint_dir=str(tmp_path)).register({"variables": fresh})
    got = jax.tree_util.tree_flatten_with_path(state.variables)[0]
    want = jax.tree_util.tree_flatten_with_path(variables)[0]
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(np.asarray(g).tobytes() == np.asarray(w).tobytes() for (_, g), (_, w) in zip(got, want, strict=True))
    names = set(lattice_arrays(tmp_path))
    assert {"variables/params/Dense_0/kernel", "variables/batch_stats/BatchNorm_0/mean"} <= names


def lattice_arrays(path: object) -> dict[str, np.ndarray]:
    import lattice

    return lattice.load_arrays(path)
