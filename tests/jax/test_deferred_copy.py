"""Arrays a codec can freeze (JAX on the CPU, TensorFlow tensors) are copied after ``checkpoint()``
returns: training that changes them right away (a donating jitted step, an optimizer's in-place
update) must not leak into the checkpoint, which holds the values of the checkpointed step."""

from __future__ import annotations

import numpy as np
import pytest

import lattice
from lattice.core import snapshot


def test_jax_arrays_are_frozen_and_a_donating_step_does_not_change_the_checkpoint(tmp_path, monkeypatch) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    started = []
    real = snapshot._fill_deferred
    monkeypatch.setattr(snapshot, "_fill_deferred", lambda snap, d: (started.append(len(d)), real(snap, d)))
    s = lattice.new_session(checkpoint_dir=str(tmp_path), every_steps=None)
    state = s.register({"params": {"w": jnp.arange(1 << 16, dtype=jnp.float32), "b": jnp.ones(3)}})
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a: a * 0 - 7, p), donate_argnums=0)
    s.checkpoint()
    state.params = step(state.params)  # donates the arrays the snapshot still has to copy
    s.wait()
    assert started == [2]  # both arrays were copied in the background
    s.close()
    again = lattice.new_session(checkpoint_dir=str(tmp_path), every_steps=None)
    restored = again.register({"params": {"w": jnp.zeros(1 << 16, dtype=jnp.float32), "b": jnp.zeros(3)}})
    assert np.array_equal(np.asarray(restored.params["w"]), np.arange(1 << 16, dtype=np.float32))
    assert np.array_equal(np.asarray(restored.params["b"]), np.ones(3))
    again.close()


def test_tf_variables_are_frozen_and_an_update_after_checkpoint_does_not_change_it(tmp_path) -> None:
    tf = pytest.importorskip("tensorflow")
    s = lattice.new_session(checkpoint_dir=str(tmp_path), every_steps=None)
    v = tf.Variable(tf.range(1 << 16, dtype=tf.float32))
    s.register({"v": v})
    s.checkpoint()
    v.assign_add(tf.ones(1 << 16))  # copy on write: the frozen view keeps the checkpointed values
    s.wait()
    s.close()
    w = tf.Variable(tf.zeros(1 << 16))
    again = lattice.new_session(checkpoint_dir=str(tmp_path), every_steps=None)
    again.register({"v": w})
    assert np.array_equal(w.numpy(), np.arange(1 << 16, dtype=np.float32))
    again.close()


def test_a_failing_background_copy_commits_nothing(tmp_path, monkeypatch) -> None:
    jax = pytest.importorskip("jax")

    def broken(snap, deferred):
        snapshot._abort(snap, RuntimeError("copy failed"))

    monkeypatch.setattr(snapshot, "_fill_deferred", broken)
    s = lattice.new_session(checkpoint_dir=str(tmp_path), every_steps=None)
    s.register({"params": {"w": jax.numpy.ones(8)}})
    s.checkpoint()
    with pytest.raises(lattice.LatticeError, match="copy failed"):
        s.wait()
    s.close()
    assert not list(tmp_path.glob("step-*"))
