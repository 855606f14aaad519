"""JAX pytrees through Lattice: any structure (dicts, lists, tuples, NamedTuples, dataclasses,
flax structs) and any dtype round-trip bit for bit with the registered structure and dtypes;
the state handle takes new values; PRNG keys (typed and raw) keep their impl and stream;
mismatches are refused with a message naming the key."""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any, NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lattice  # noqa: E402
from lattice.core.errors import StateMismatchError, UnsupportedObjectError  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16", "int32", "int16", "int8", "uint32", "uint16", "uint8", "bool",
          "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
          "float8_e4m3b11fnuz", "float8_e4m3", "float8_e3m4", "float8_e8m0fnu", "float4_e2m1fn",
          "int4", "uint4", "int2", "uint2"]


class Pair(NamedTuple):
    a: Any
    b: Any


def make_array(dtype: str, shape: tuple[int, ...], seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    if dtype == "bool":
        host = rng.integers(0, 2, shape).astype(bool)
    elif jnp.issubdtype(dt, jnp.integer):
        info = jnp.iinfo(dt)
        host = rng.integers(int(info.min), int(info.max) + 1, shape).astype(dt)
    elif jnp.issubdtype(dt, jnp.complexfloating):
        host = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    else:
        host = (rng.standard_normal(shape) * 3).astype(dt)
    return jnp.asarray(host)


arrays = st.builds(make_array, st.sampled_from(DTYPES),
                   st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 2**31))
leaves = st.one_of(arrays, st.integers(-5, 5), st.none(), st.floats(-1e3, 1e3))
trees = st.recursive(leaves, lambda kids: st.one_of(
    st.lists(kids, max_size=3),
    st.lists(kids, max_size=3).map(tuple),
    st.dictionaries(st.text("abcxyz_", min_size=1, max_size=4), kids, max_size=3),
    st.builds(Pair, kids, kids),
), max_leaves=8)


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def zeros_like(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros_like(x) if isinstance(x, jax.Array) else x, tree)


def assert_same_tree(restored: Any, expected: Any) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for r, e in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert type(r) is type(e), (type(r), type(e))
        if isinstance(e, jax.Array):
            assert r.dtype == e.dtype and same_bits(r, e)
        else:
            assert r == e


def roundtrip(tree: Any, template: Any, directory: str) -> Any:
    s = lattice.new_session(checkpoint_dir=directory, capture_rng=False)
    try:
        s.register({"tree": tree})
        assert s.items["tree"].adapter.name == "jax.pytree"
        s.checkpoint()
        s.wait()
    finally:
        s.close()
    s = lattice.new_session(checkpoint_dir=directory, capture_rng=False)
    try:
        state = s.register({"tree": template})
        assert state.restored_from is not None
        return state.tree
    finally:
        s.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=arrays, rest=trees)
def test_any_pytree_of_any_dtype_and_shape_round_trips_bit_for_bit(first: jax.Array, rest: Any) -> None:
    tree = {"first": first, "rest": rest}
    with tempfile.TemporaryDirectory() as d:
        restored = roundtrip(tree, zeros_like(tree), d)
    assert_same_tree(restored, tree)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "int4", "float32"])
def test_zero_d_empty_and_narrow_dtypes(tmp_path, dtype: str, shape: tuple[int, ...]) -> None:
    x = make_array(dtype, shape, 7)
    restored = roundtrip(x, jnp.zeros(shape, dtype), str(tmp_path))
    assert isinstance(restored, jax.Array) and restored.dtype == x.dtype and same_bits(restored, x)


def test_state_handle_assignment_is_what_the_checkpoint_captures(make_session, tmp_path) -> None:
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    s = make_session(checkpoint_dir=str(tmp_path), every_steps=2, on_busy="wait")
    state = s.register({"params": params})
    for i in range(1, 5):
        state.params = jax.tree.map(lambda x, i=i: x + i, state.params)  # noqa: B023
        s.step_done()
    s.wait()
    arrays = lattice.load_arrays(tmp_path)
    assert s.step == 4 and np.array_equal(arrays["params/w"], np.full((2, 3), 10.0, np.float32))
    fresh = make_session(checkpoint_dir=str(tmp_path)).register({"params": params})
    assert fresh.step == 4 and np.array_equal(fresh.params["b"], np.full(3, 10.0, np.float32))
    assert fresh.params is not params and isinstance(fresh.params["w"], jax.Array)


def test_assigning_another_structure_is_refused_at_once(make_session, tmp_path) -> None:
    state = make_session(checkpoint_dir=str(tmp_path)).register({"params": {"w": jnp.zeros(2)}})
    with pytest.raises(StateMismatchError, match="structure differs"):
        state.params = {"w": jnp.zeros(2), "extra": jnp.zeros(1)}
    state.params = {"w": jnp.ones(2)}  # same structure: fine
    with pytest.raises(TypeError, match="jax.pytree"):
        state.params = "not a pytree"


def train(params: Any, opt_state: Any, tx: Any, steps: int) -> tuple[Any, Any]:
    for i in range(steps):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p + i), params)  # noqa: B023
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def test_optax_adam_state_resumes_identically(make_session, tmp_path) -> None:
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params = {"dense": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4), "bias": jnp.zeros(4, jnp.bfloat16)}}
    p, o = train(params, tx.init(params), tx, 3)
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"params": p, "opt_state": o})
    s.checkpoint()
    s.wait()
    want_p, want_o = train(p, o, tx, 3)

    state = make_session(checkpoint_dir=str(tmp_path)).register({"params": params, "opt_state": tx.init(params)})
    assert isinstance(state.opt_state[1][0], optax.ScaleByAdamState) and int(state.opt_state[1][0].count) == 3
    got_p, got_o = train(state.params, state.opt_state, tx, 3)
    assert_same_tree(got_p, want_p)
    assert_same_tree(got_o, want_o)


@pytest.mark.parametrize("make_key", [
    lambda seed: jax.random.key(seed),
    lambda seed: jax.random.key(seed, impl="rbg"),
    lambda seed: jax.random.PRNGKey(seed),  # raw uint32 key
    lambda seed: jax.random.split(jax.random.key(seed), 3),  # an array of typed keys
], ids=["threefry", "rbg", "raw", "key-array"])
def test_prng_keys_keep_their_impl_and_stream(make_session, tmp_path, make_key) -> None:
    key = make_key(7)
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"key": key, "nested": {"k": [make_key(8)], "x": jnp.ones(2)}})
    s.checkpoint()
    s.wait()
    state = make_session(checkpoint_dir=str(tmp_path)).register(
        {"key": make_key(0), "nested": {"k": [make_key(0)], "x": jnp.zeros(2)}})
    for got, want in ((state.key, key), (state.nested["k"][0], make_key(8))):
        assert got.dtype == want.dtype and got.shape == want.shape
        flat_got, flat_want = jnp.reshape(got, (-1, *got.shape[got.ndim:])), jnp.reshape(want, (-1, *want.shape[want.ndim:]))
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(got)) == str(jax.random.key_impl(want))
            flat_got, flat_want = jax.random.key_data(got), jax.random.key_data(want)
        assert same_bits(flat_got, flat_want)
        draw = (lambda k: jax.random.uniform(k, (4,))) if got.ndim == 0 or not jax.dtypes.issubdtype(
            got.dtype, jax.dtypes.prng_key) else (lambda k: jax.vmap(lambda kk: jax.random.uniform(kk, (2,)))(k))
        assert same_bits(draw(got), draw(want))


def test_key_of_another_impl_is_refused(make_session, tmp_path) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"key": jax.random.key(1, impl="rbg")})
    s.checkpoint()
    s.wait()
    with pytest.raises(StateMismatchError, match="rbg"):
        make_session(checkpoint_dir=str(tmp_path)).register({"key": jax.random.key(0, impl="unsafe_rbg")})


def test_shape_mismatch_names_the_item_and_key(make_session, tmp_path) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"params": {"layer": {"w": jnp.zeros((2, 3))}}})
    s.checkpoint()
    s.wait()
    with pytest.raises(StateMismatchError, match=r"params.*layer/w.*\[2, 3\]"):
        make_session(checkpoint_dir=str(tmp_path)).register({"params": {"layer": {"w": jnp.zeros((3, 3))}}})
    with pytest.raises(StateMismatchError, match="other"):
        make_session(checkpoint_dir=str(tmp_path)).register({"params": {"layer": {"w": jnp.zeros((2, 3))},
                                                                         "other": jnp.zeros(1)}})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Registered:
    w: jax.Array
    n: jax.Array
    name: str = dataclasses.field(default="static", metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class Plain:  # not registered with JAX: Lattice treats its fields as children
    params: Any
    step: int
    label: str


def test_namedtuples_dataclasses_flax_structs_and_train_state(make_session, tmp_path) -> None:
    flax_struct = pytest.importorskip("flax.struct")
    from flax.training import train_state

    @flax_struct.dataclass
    class Struct:
        a: jax.Array
        fn: Any = flax_struct.field(pytree_node=False, default=None)

    tx = optax.sgd(0.1)
    params = {"w": jnp.arange(4.0)}

    def build(v: float) -> dict[str, Any]:
        p = jax.tree.map(lambda x: x * v, params)
        return {
            "pair": Pair(jnp.full(2, v), (jnp.full(1, v, jnp.int32), None)),
            "registered": Registered(jnp.full(3, v), jnp.asarray(int(v))),
            "plain": Plain({"w": jnp.full(2, v)}, int(v), f"label{int(v)}"),
            "struct": Struct(jnp.full(2, v, jnp.bfloat16), fn=len),
            "ts": train_state.TrainState.create(apply_fn=len, params=p, tx=tx),
        }

    s = make_session(checkpoint_dir=str(tmp_path))
    s.register(build(3.0))
    assert {s.items[n].adapter.name for n in build(0.0)} == {"jax.pytree"}
    s.checkpoint()
    s.wait()
    state = make_session(checkpoint_dir=str(tmp_path)).register(build(0.0))
    want = build(3.0)
    for name in want:
        if name != "plain":  # JAX sees a plain dataclass as one leaf
            assert_same_tree(getattr(state, name), want[name])
    assert type(state.plain) is Plain and same_bits(state.plain.params["w"], want["plain"].params["w"])
    assert state.plain.label == "label3" and state.plain.step == 3 and state.struct.fn is len
    assert state.ts.tx is tx and state.ts.apply_fn is len


def test_deleted_array_is_refused_with_a_hint(make_session, tmp_path) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    state = s.register({"params": {"w": jnp.ones(3)}})
    state.params["w"].delete()  # what donating it to a jitted function does
    with pytest.raises(UnsupportedObjectError, match="deleted"):
        s.checkpoint()


def test_plain_values_keep_their_adapter_when_jax_is_imported(make_session, tmp_path) -> None:
    s = make_session(checkpoint_dir=str(tmp_path))
    s.register({"epoch": 3, "host": {"x": np.ones(2)}, "dev": {"x": jnp.ones(2)},
                "mixed": {1: np.ones(2), "a": 2}})  # keys JAX cannot sort: not a pytree to JAX
    assert [s.items[n].adapter.name for n in ("epoch", "host", "dev", "mixed")] == [
        "python.value", "python.value", "jax.pytree", "python.value"]
