"""Keras 3 models and optimizers through Lattice, and the ``lattice.keras.Checkpoint`` callback:
training that is interrupted and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import lattice
import lattice.keras
from lattice.core.errors import StateMismatchError

tf.config.experimental.enable_op_determinism()
X = np.random.RandomState(0).randn(64, 5).astype("float32")
Y = (X @ np.linspace(-1, 1, 10).reshape(5, 2)).astype("float32")


def make_model(compile: bool = True) -> keras.Model:
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dropout(0.2), keras.layers.Dense(2)])
    if compile:
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def weights(model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None) -> list[bytes]:
    out = [v.numpy().tobytes() for v in model.variables]
    return out + ([v.numpy().tobytes() for v in optimizer.variables] if optimizer is not None else [])


def train_steps(model: keras.Model, opt: keras.optimizers.Optimizer, first: int, n: int) -> None:
    for i in range(first, first + n):
        x, y = X[(i * 8) % 64:(i * 8) % 64 + 8], Y[(i * 8) % 64:(i * 8) % 64 + 8]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))


@pytest.mark.timeout(120)
def test_model_and_optimizer_continue_bit_identically_even_before_the_optimizer_is_built(tmp_path: Path) -> None:
    model, opt = make_model(compile=False), keras.optimizers.Adam(0.01)
    train_steps(model, opt, 0, 6)
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"model": model, "optimizer": opt})
    s.checkpoint()
    s.wait()
    s.close()
    train_steps(model, opt, 6, 5)
    expected = weights(model, opt)

    model2, opt2 = make_model(compile=False), keras.optimizers.Adam(0.01)
    assert not opt2.built  # Keras creates the slots at the first step
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"model": model2, "optimizer": opt2})
    assert int(opt2.iterations.numpy()) == 6  # restored at once; the moments wait for the build
    s.checkpoint()  # a checkpoint before the first step keeps the waiting moments
    s.wait()
    s.close()
    model3, opt3 = make_model(compile=False), keras.optimizers.Adam(0.01)
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"model": model3, "optimizer": opt3})
    s.close()
    train_steps(model3, opt3, 6, 5)
    assert weights(model3, opt3) == expected


def test_a_model_without_variables_gets_a_hint_to_build_it(tmp_path: Path) -> None:
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    s.register({"model": make_model()})
    s.checkpoint()
    s.wait()
    s.close()
    unbuilt = keras.Sequential([keras.layers.Dense(16), keras.layers.Dense(2)])
    s = lattice.new_session(checkpoint_dir=str(tmp_path))
    with pytest.raises(StateMismatchError, match="build it first"):
        s.register({"model": unbuilt})
    s.close()


class Interrupt(keras.callbacks.Callback):
    """Stands in for a crash: raises after the given number of training batches."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.seen = after, 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt


def fit(ckpt: Path, reshuffle: bool, interrupt_after: int | None = None) -> tuple[lattice.keras.Checkpoint, keras.Model]:
    model = make_model()
    ds = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(64, seed=3, reshuffle_each_iteration=reshuffle).batch(8)
    cb = lattice.keras.Checkpoint(checkpoint_dir=str(ckpt), every_steps=5, on_busy="wait", replay_epochs=reshuffle)
    extra = [Interrupt(interrupt_after)] if interrupt_after else []
    history = model.fit(ds, epochs=4, callbacks=[cb, *extra], verbose=0, shuffle=False)
    cb.epochs_run = list(history.epoch)
    return cb, model


@pytest.mark.timeout(180)
@pytest.mark.parametrize("reshuffle", [False, True], ids=["initial-epoch", "replay-epochs"])
def test_callback_resumes_at_the_right_epoch_and_batch(tmp_path: Path, reshuffle: bool) -> None:
    cb, model = fit(tmp_path / "a", reshuffle)
    expected = weights(model, model.optimizer)
    assert cb.state.step == 32 and cb.progress == {"epoch": 4, "batch": 0}
    lattice.close()

    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", reshuffle, interrupt_after=13)  # 8 batches an epoch: in epoch 1
    lattice.close()  # the newest committed checkpoint is step 10: epoch 1 after batch 2
    cb, model = fit(tmp_path / "b", reshuffle)
    assert cb.state.restored_from.endswith("step-0000000010")
    assert cb.epochs_run == ([0, 1, 2, 3] if reshuffle else [1, 2, 3])
    assert cb.state.step == 32 and cb.progress == {"epoch": 4, "batch": 0}
    assert weights(model, model.optimizer) == expected

    again = model.fit(X, Y, epochs=1, batch_size=16, callbacks=[cb], verbose=0)  # nothing to resume
    assert again.epoch == [0] and cb.state.step == 36


@pytest.mark.timeout(120)
def test_a_finished_fit_restarted_trains_no_more(tmp_path: Path) -> None:
    cb, model = fit(tmp_path, reshuffle=False)
    expected = weights(model)
    lattice.close()
    cb, model = fit(tmp_path, reshuffle=False)
    assert cb.epochs_run == [] and cb.state.step == 32 and weights(model) == expected


def test_every_lattice_option_is_an_option_not_an_object_to_register() -> None:
    from lattice.keras import Checkpoint

    cb = Checkpoint(every_steps=5, restore=False, capture_rng=False, part_timeout=30.0, rng=object())
    assert cb._options == {"every_steps": 5, "restore": False, "capture_rng": False, "part_timeout": 30.0}
    assert list(cb._objects) == ["rng"]
