"""Keras training made elastic by one callback: ``lattice.keras.Checkpoint``.

    lattice run --checkpoint-dir ckpt examples/keras_train.py --out weights.npz
    python examples/keras_train.py --checkpoint-dir ckpt --out weights.npz   # without the agent

Kill it at any point (or let ``lattice run`` restart it after a crash): the next start restores
the newest checkpoint and ``fit`` continues at the same epoch and batch, on the same data, so
the final weights are bit-identical to an uninterrupted run (CPU, op determinism on).
A small regression MLP on synthetic data; every flag has a small default.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lattice  # noqa: E402
import lattice.keras  # noqa: E402


class Progress(keras.callbacks.Callback):
    """Prints one line per trained batch (``pid P step N``); optionally slows each batch down."""

    def __init__(self, cb: lattice.keras.Checkpoint, sleep: float):
        super().__init__()
        self.cb, self.sleep = cb, sleep

    def on_train_begin(self, logs: dict | None = None) -> None:
        print(f"pid {os.getpid()} start at step {self.cb.state.step} progress {self.cb.progress}", flush=True)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        time.sleep(self.sleep)
        print(f"pid {os.getpid()} step {self.cb.state.step}", flush=True)


def data(seed: int) -> tf.data.Dataset:
    rng = np.random.RandomState(seed)
    x = rng.randn(256, 16).astype("float32")
    y = np.tanh(x @ rng.randn(16, 4)).astype("float32")
    # reshuffled every epoch: the order depends on how many epochs were iterated, hence replay_epochs
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=seed).batch(32)


def model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dropout(0.1), keras.layers.Dense(4)])
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--every-steps", type=int, default=5, help="checkpoint every N batches")
    p.add_argument("--checkpoint-dir", default=None, help="default: $LATTICE_CHECKPOINT_DIR (set by lattice run)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the final weights here (.npz)")
    args = p.parse_args()
    tf.config.experimental.enable_op_determinism()
    options = {"checkpoint_dir": args.checkpoint_dir} if args.checkpoint_dir else {}
    cb = lattice.keras.Checkpoint(every_steps=args.every_steps, on_busy="wait", replay_epochs=True, **options)
    m = model(args.seed)
    m.fit(data(args.seed), epochs=args.epochs, callbacks=[cb, Progress(cb, args.sleep)], verbose=0)
    print(f"pid {os.getpid()} done at step {cb.state.step}", flush=True)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        np.savez(args.out, *[v.numpy() for v in m.variables])


if __name__ == "__main__":
    main()
