"""A deterministic flax (linen) + optax training run on the CPU that checkpoints with Lattice.

Parameters, the optimizer state and a PRNG key are registered as pytrees; each step hands the
new values over through the state handle (``state.params = params``), and ``lattice.step()``
checkpoints by policy. Kill it at any point and run it again (or run it under
``lattice run``, which restarts it): it resumes from the newest checkpoint and ends with the
same weights as an uninterrupted run.

    python examples/jax_train.py --checkpoint-dir ckpt --steps 60 --out final.npz
    lattice run --checkpoint-dir ckpt examples/jax_train.py --steps 60 --out final.npz
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lattice


class MLP(nn.Module):
    """Two dense layers with dropout (so the PRNG key matters)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.relu(nn.Dense(32)(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(1)(x)


MODEL = MLP()
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))


def batch(step: int) -> tuple[jax.Array, jax.Array]:
    """The batch of a step: a pure function of the step, so a resumed run sees the same data."""
    key = jax.random.fold_in(jax.random.key(1234), step)
    x = jax.random.normal(key, (64, 8))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


@jax.jit
def train_step(params: Any, opt_state: Any, key: jax.Array, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
    """One Adam step on the mean squared error, with dropout drawn from ``key``."""

    def loss_fn(p: Any) -> jax.Array:
        pred = MODEL.apply(p, x, rngs={"dropout": key})
        return jnp.mean((pred - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def flat(tree: Any) -> dict[str, np.ndarray]:
    """``{"params/Dense_0/kernel": array, ...}`` for np.savez."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint-dir", default=os.environ.get("LATTICE_CHECKPOINT_DIR", "ckpt"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step (to watch it)")
    p.add_argument("--out", help="write the final parameters here (.npz)")
    args = p.parse_args(argv)

    params = MODEL.init(jax.random.key(0), jnp.zeros((1, 8)), train=False)
    lattice.configure(checkpoint_dir=args.checkpoint_dir, every_steps=args.every)
    state = lattice.register(params=params, opt_state=OPTIMIZER.init(params), key=jax.random.key(42))
    where = f"restored step {state.step}" if state.restored_from else "fresh start"
    print(f"[jax_train] pid {os.getpid()}: {where}", flush=True)

    while state.step < args.steps:
        key, sub = jax.random.split(state.key)
        x, y = batch(state.step)
        params, opt_state, loss = train_step(state.params, state.opt_state, sub, x, y)
        state.params, state.opt_state, state.key = params, opt_state, key  # hand the new values over
        print(f"[jax_train] step {state.step + 1} loss {float(loss):.6f}", flush=True)
        lattice.step()
        time.sleep(args.sleep)

    lattice.checkpoint()
    lattice.wait()
    if args.out:
        np.savez(args.out, **flat(state.params))
    print(f"[jax_train] done at step {state.step}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
