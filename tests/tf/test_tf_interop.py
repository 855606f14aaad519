"""Interop with the real TensorFlow library: Lattice checkpoints exported as tf.train.Checkpoint
and read back by TensorFlow, checkpoints written by TensorFlow imported into Lattice, and a
TensorFlow checkpoint loaded into live registered Keras objects."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import lattice
from lattice.interop import tf as tf_interop


class Net(tf.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = tf.random.Generator.from_seed(seed)
        self.dense = tf.Module()
        self.dense.kernel = tf.Variable(g.normal((3, 4)))
        self.layers = [tf.Variable(g.uniform((2,), 0, 100, dtype=tf.int64)),
                       {"a.b": tf.Variable(tf.cast(g.normal((5,)), tf.bfloat16))}]


def same(a: tf.Module, b: tf.Module) -> bool:
    return all(x.numpy().tobytes() == y.numpy().tobytes() for x, y in zip(a.variables, b.variables, strict=True))


def test_export_is_read_back_by_tensorflow_into_the_original_kinds_of_objects(tmp_path: Path) -> None:
    net, gen, var = Net(1), tf.random.Generator.from_seed(4), tf.Variable([1, 2, 3])
    gen.normal((3,))
    s = lattice.new_session(checkpoint_dir=str(tmp_path / "lattice"))
    s.register({"model": net, "gen": gen, "v": var, "epoch": 5})
    s.step = 12
    s.checkpoint()
    s.wait()
    s.close()
    prefix = tf_interop.export_tf(tmp_path / "lattice", tmp_path / "tf" / "ckpt")
    names = dict(tf.train.list_variables(prefix))
    assert names["model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"] == [3, 4]
    assert names["model/layers/1/a..b/.ATTRIBUTES/VARIABLE_VALUE"] == [5]
    assert tf.train.load_checkpoint(prefix).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE") == 5
    net2, gen2, var2 = Net(2), tf.random.Generator.from_seed(9), tf.Variable([0, 0, 0])
    status = tf.train.Checkpoint(model=net2, gen=gen2, v=var2).read(prefix)
    status.assert_existing_objects_matched()
    assert same(net, net2) and var2.numpy().tolist() == [1, 2, 3]
    assert gen2.normal((4,)).numpy().tobytes() == gen.normal((4,)).numpy().tobytes()


def test_a_checkpoint_written_by_tensorflow_imports_and_restores_with_register(tmp_path: Path) -> None:
    net, gen = Net(3), tf.random.Generator.from_seed(11)
    gen.normal((5,))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=net, gen=gen, v=tf.Variable([7, 8])),
                                         str(tmp_path / "tf"), max_to_keep=2)
    manager.save()
    manager.save()
    path = tf_interop.import_tf(tmp_path / "tf", tmp_path / "lattice")
    assert path.name == "step-0000000002"  # the checkpoint's save_counter
    net2, gen2, var2 = Net(4), tf.random.Generator.from_seed(0), tf.Variable([0, 0])
    s = lattice.new_session(checkpoint_dir=str(tmp_path / "lattice"))
    state = s.register({"model": net2, "gen": gen2, "v": var2})
    s.close()
    assert state.step == 2 and same(net, net2) and var2.numpy().tolist() == [7, 8]
    assert gen2.normal((4,)).numpy().tobytes() == gen.normal((4,)).numpy().tobytes()


def make() -> tuple[keras.Model, keras.optimizers.Optimizer]:
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    return model, keras.optimizers.Adam(0.05)


def step(model: keras.Model, opt: keras.optimizers.Optimizer, i: int) -> None:
    x = np.random.RandomState(i).randn(8, 4).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - x.sum(1, keepdims=True)) ** 2)
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables, strict=True))


def test_a_tensorflow_checkpoint_loads_into_registered_keras_objects_and_back_out(tmp_path: Path) -> None:
    model, opt = make()
    for i in range(4):
        step(model, opt, i)
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "tf" / "ckpt"))
    for i in range(4, 7):
        step(model, opt, i)
    expected = [v.numpy().tobytes() for v in model.variables + opt.variables]

    model2, opt2 = make()
    step(model2, opt2, 99)  # built, and different
    s = lattice.new_session(checkpoint_dir=str(tmp_path / "lattice"))
    s.register({"model": model2, "optimizer": opt2, "epoch": 0})
    assert tf_interop.restore_tf_checkpoint(prefix, session=s) == ["model", "optimizer"]
    assert int(opt2.iterations.numpy()) == 4
    for i in range(4, 7):
        step(model2, opt2, i)
    assert [v.numpy().tobytes() for v in model2.variables + opt2.variables] == expected
    out = tf_interop.save_tf_checkpoint(tmp_path / "out" / "ckpt", session=s)
    s.close()
    model3, opt3 = make()
    step(model3, opt3, 98)
    tf.train.Checkpoint(model=model3, optimizer=opt3).read(out).assert_consumed()
    assert [v.numpy().tobytes() for v in model3.variables + opt3.variables] == expected


def test_lattice_ckpt_export_and_import_commands_with_format_tf(tmp_path: Path, capsys) -> None:
    from lattice.cli import main

    net = Net(5)
    s = lattice.new_session(checkpoint_dir=str(tmp_path / "a"))
    s.register({"model": net})
    s.step = 3
    s.checkpoint()
    s.wait()
    s.close()
    assert main(["ckpt", "export", "--format", "tf", str(tmp_path / "a"), str(tmp_path / "tf" / "ckpt")]) == 0
    prefix = capsys.readouterr().out.split("tf.train.Checkpoint ")[1].strip()
    net2 = Net(6)
    tf.train.Checkpoint(model=net2).read(prefix).assert_existing_objects_matched()
    assert same(net, net2)
    assert main(["ckpt", "import", "--format", "tf", "--step", "7", prefix, str(tmp_path / "b")]) == 0
    net3 = Net(7)
    s = lattice.new_session(checkpoint_dir=str(tmp_path / "b"))
    assert s.register({"model": net3}).step == 7
    s.close()
    assert same(net, net3)
