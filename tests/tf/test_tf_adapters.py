"""tf.Variable, tf.Module, tf.random.Generator and tf.data iterators through a real
checkpoint: exact round trips over dtypes and shapes (hypothesis), in-place restore,
and clear errors when the registered object does not match."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lattice
from lattice.adapters.tensorflow import TFCodec, host_array
from lattice.core.errors import StateMismatchError

DTYPES = ["float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
          "uint16", "uint32", "uint64", "bool", "complex64", "complex128"]
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def random_array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Arbitrary bit patterns (NaNs, infinities, subnormals) for floats; any value for ints."""
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    raw = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    if dtype == "bool":
        return (raw % 2).astype(bool).reshape(shape)
    return raw.view(np_dtype).reshape(shape)


def same_bits(a: Any, b: Any) -> bool:
    x, y = host_array(a), host_array(b)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


class Net(tf.Module):
    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], seed: int | None):
        super().__init__()
        make = (lambda d, s, i: random_array(d, s, seed + i)) if seed is not None else \
            (lambda d, s, i: np.zeros(s, tf.as_dtype(d).as_numpy_dtype))
        self.first = tf.Variable(make(*specs[0], 0))
        self.layers = [tf.Variable(make(d, s, i + 1)) for i, (d, s) in enumerate(specs[1:])]
        self.sub = tf.Module()
        self.sub.table = {"w": tf.Variable(make("float32", (2, 3), 99), trainable=False)}


@pytest.mark.timeout(120)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), shapes), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_module_and_variable_round_trip_bit_exactly_over_dtypes_and_shapes(specs: list, seed: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        saved, var = Net(specs, seed), tf.Variable(random_array(*specs[-1], seed + 50))
        s = lattice.new_session(checkpoint_dir=d, capture_rng=False)
        s.register({"net": saved, "var": var})
        s.checkpoint()
        s.wait()
        s.close()
        fresh, fresh_var = Net(specs, None), tf.Variable(np.zeros_like(host_array(var)))
        s = lattice.new_session(checkpoint_dir=d, capture_rng=False)
        state = s.register({"net": fresh, "var": fresh_var})
        s.close()
        assert state.net is fresh and state.var is fresh_var  # restored in place
        assert len(fresh.variables) == len(saved.variables)
        for a, b in zip(saved.variables, fresh.variables, strict=True):
            assert same_bits(a, b), (a.dtype, a.shape)
        assert same_bits(var, fresh_var)


def test_tf_tensors_are_copied_from_a_zero_copy_view_of_the_variable() -> None:
    v = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))
    a, b = host_array(v), host_array(v)
    assert np.shares_memory(a, b)  # both alias the variable's buffer: no copy before the snapshot's
    dst = np.zeros(48, dtype=np.uint8)
    TFCodec().copy_into(v, dst)
    assert dst.view(np.float32).tolist() == list(range(12))
    assert TFCodec().byte_view(v) is None  # restore never writes into TensorFlow's memory


def test_generator_and_iterator_continue_where_they_were(tmp_path) -> None:
    ds = tf.data.Dataset.range(1000).shuffle(64, seed=5).map(lambda x: x * 2).batch(3).prefetch(2)
    gen, it = tf.random.Generator.from_seed(7), iter(ds)
    for _ in range(11):
        next(it)
    gen.normal((4,))
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"gen": gen, "it": it})
    s.checkpoint()
    s.wait()
    s.close()
    expect_batches = [next(it).numpy().tolist() for _ in range(5)]
    expect_draws = gen.normal((6,)).numpy()
    gen2, it2 = tf.random.Generator.from_seed(123), iter(ds)
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"gen": gen2, "it": it2})
    s.close()
    assert [next(it2).numpy().tolist() for _ in range(5)] == expect_batches
    assert gen2.normal((6,)).numpy().tobytes() == expect_draws.tobytes()


def test_generator_with_another_algorithm_is_refused(tmp_path) -> None:
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"gen": tf.random.Generator.from_seed(1, alg="philox")})
    s.checkpoint()
    s.wait()
    s.close()
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    with pytest.raises(StateMismatchError, match=r"RNG algorithm|shape \[3\] int64, the registered object has shape \[2\]"):
        s.register({"gen": tf.random.Generator.from_seed(1, alg="threefry")})
    s.close()


def test_module_with_other_variables_or_shapes_is_refused_by_name(tmp_path) -> None:
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"net": Net([("float32", (2,))], 1)})
    s.checkpoint()
    s.wait()
    s.close()
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    with pytest.raises(StateMismatchError, match=r"first.*\[2\].*\[3\]"):
        s.register({"net": Net([("float32", (3,))], 1)})
    s.close()
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    with pytest.raises(StateMismatchError, match="layers/0"):
        s.register({"net": Net([("float32", (2,)), ("int32", (1,))], 1)})
    s.close()


def test_adapters_are_chosen_for_tf_objects() -> None:
    names = {type(o).__name__: lattice.ADAPTERS.resolve(o).name for o in (
        tf.Variable(1.0), tf.Module(), tf.random.Generator.from_seed(1), iter(tf.data.Dataset.range(3)))}
    assert names == {"ResourceVariable": "tf.variable", "Module": "tf.module",
                     "Generator": "tf.random.generator", "OwnedIterator": "tf.data.iterator"}


def test_import_lattice_imports_neither_tensorflow_nor_keras(run_python) -> None:
    r = run_python("import sys, lattice; assert not {'tensorflow', 'keras'} & set(sys.modules), "
                   "sorted({'tensorflow', 'keras'} & set(sys.modules)); print('ok')", timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
