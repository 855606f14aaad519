"""TensorFlow adapters: ``tf.Variable``, ``tf.Module`` (every variable it tracks),
``tf.random.Generator``, the position of a ``tf.data`` iterator, and (from
``tensorflow_keras``) Keras 3 models, layers, optimizers and variables.

Tensors are snapshotted by copying from a zero-copy host view of the variable's buffer
(``read_value()`` aliases it on the CPU) straight into the host buffer, so a variable costs
one copy. Restore reads the file into a host array and ``assign``s it: TensorFlow owns
variable memory, and writing into it behind its back would break its copy-on-write reads.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tensorflow as tf

from ..core.adapter import Adapter
from ..core.arrays import NumpyCodec
from ..core.errors import StateMismatchError
from . import tensorflow_keras as _keras

log = logging.getLogger("lattice")

_DTYPES: dict[tf.DType, str] = {
    tf.float64: "float64", tf.float32: "float32", tf.float16: "float16", tf.bfloat16: "bfloat16",
    tf.int64: "int64", tf.int32: "int32", tf.int16: "int16", tf.int8: "int8",
    tf.uint64: "uint64", tf.uint32: "uint32", tf.uint16: "uint16", tf.uint8: "uint8",
    tf.bool: "bool", tf.complex64: "complex64", tf.complex128: "complex128",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(tf.dtypes.experimental, _name):
        _DTYPES[getattr(tf.dtypes.experimental, _name)] = _name
_BY_NAME = {v: k for k, v in _DTYPES.items()}


def _tf_value(x: Any) -> Any:
    """The TF tensor behind ``x``: a variable's current value (an alias on the CPU), a
    Keras variable's backing variable's value, or ``x`` itself."""
    if _keras.is_keras_variable(x):
        x = x.value
    if isinstance(x, tf.Variable):
        with tf.init_scope():  # snapshot and restore always run eagerly
            return x.read_value()
    return x


def host_array(x: Any) -> np.ndarray:
    """A numpy view of a TF tensor or variable's bytes (zero-copy for eager CPU tensors)."""
    t = _tf_value(x)
    numpy = getattr(t, "_numpy", None)  # EagerTensor: shares the tensor's buffer, unlike .numpy()
    return numpy() if numpy is not None else np.asarray(t)


def dtype_name(x: Any) -> str:
    dt = tf.as_dtype(x.dtype)
    if dt not in _DTYPES:
        raise TypeError(f"TensorFlow dtype {dt.name} cannot be checkpointed as an array "
                        f"(supported: {', '.join(_DTYPES.values())})")
    return _DTYPES[dt]


class TFCodec(NumpyCodec):
    """``tf.Tensor``, ``tf.Variable`` and Keras variable leaves (restored as host numpy arrays,
    which the adapters ``assign`` into the live variables; ``byte_view``/``empty``: numpy's, so
    only host arrays this codec allocated are written into, TF memory never)."""

    kind = "tf"

    def handles(self, x: Any) -> bool:
        return isinstance(x, tf.Tensor | tf.Variable) or _keras.is_keras_variable(x)

    def describe(self, x: Any) -> tuple[str, tuple[int, ...]]:
        if isinstance(x, np.ndarray):
            return super().describe(x)
        if not isinstance(x, tf.Variable) and not _keras.is_keras_variable(x) \
                and not hasattr(x, "_numpy"):
            raise TypeError("a symbolic tf.Tensor (inside tf.function) has no value to checkpoint")
        if any(d is None for d in x.shape):
            raise TypeError(f"TensorFlow value of unknown shape {x.shape} cannot be checkpointed")
        return dtype_name(x), tuple(int(d) for d in x.shape)

    def copy_into(self, x: Any, dst: np.ndarray) -> None:
        src = np.ascontiguousarray(host_array(x))
        if src.size:
            np.copyto(dst, src.reshape(-1).view(np.uint8))

    def freeze(self, x: Any) -> np.ndarray | None:
        """The value's host view: TensorFlow copies a variable's buffer before writing to it while
        a tensor read from it is alive (copy on write), so the view keeps this step's values."""
        if isinstance(x, np.ndarray):
            return None
        return host_array(x)


def assign(var: Any, value: Any, where: str) -> None:
    """``var.assign(value)`` eagerly, after checking shape and dtype; skips ``value is var``."""
    if value is var:
        return
    shape = tuple(int(d) for d in var.shape)
    if tuple(np.shape(value)) != shape:
        raise StateMismatchError(f"{where}: the checkpoint has shape {list(np.shape(value))}, "
                                 f"the registered variable has shape {list(shape)}")
    with tf.init_scope():
        var.assign(tf.convert_to_tensor(value, dtype=_BY_NAME.get(dtype_name(var))))


class VariableAdapter(Adapter):
    """A single ``tf.Variable`` (or Keras variable), restored in place by ``assign``."""

    name = "tf.variable"
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, tf.Variable) or _keras.is_keras_variable(obj)

    def save(self, obj: Any) -> Any:
        return obj

    def load(self, obj: Any, tree: Any) -> Any:
        assign(obj, tree, f"variable {getattr(obj, 'name', '')!r}")
        return obj


def _is_var(x: Any) -> bool:
    return isinstance(x, tf.Variable) or _keras.is_keras_variable(x)


def module_variables(module: tf.Module) -> dict[str, Any]:
    """Every variable a ``tf.Module`` tracks, keyed by its attribute path (``dense/kernel``,
    ``layers/0/w``): the same names ``tf.train.Checkpoint`` gives them in a plain module."""
    out: dict[str, Any] = {}
    for path, var in module._flatten(predicate=_is_var, with_path=True):
        out["/".join(str(p) for p in path)] = var
    return out


class ModuleAdapter(Adapter):
    """``tf.Module``: all its variables (trainable or not), by attribute path."""

    name = "tf.module"
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, tf.Module) and not isinstance(obj, tf.random.Generator)

    def save(self, obj: Any) -> Any:
        return module_variables(obj)

    def load(self, obj: Any, tree: Any) -> Any:
        live = module_variables(obj)
        missing, unexpected = sorted(set(live) - set(tree)), sorted(set(tree) - set(live))
        if missing or unexpected:
            raise StateMismatchError(
                f"tf.Module {type(obj).__name__} does not match the checkpoint: missing from the "
                f"checkpoint {missing[:10]}, not in the module {unexpected[:10]}")
        for key, var in live.items():
            assign(var, tree[key], f"{type(obj).__name__}/{key}")
        return obj


class TFGlobalRNG:
    """TensorFlow's global ``tf.random.Generator`` (``tf.random.get_global_generator()``);
    register ``TFGlobalRNG()`` to capture it."""


class GeneratorAdapter(Adapter):
    """``tf.random.Generator``: its algorithm and state; per rank, like every RNG."""

    name = "tf.random.generator"
    priority = 110  # a Generator is also a tf.Module
    per_rank = True

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, tf.random.Generator | TFGlobalRNG)

    def _gen(self, obj: Any) -> tf.random.Generator:
        return tf.random.get_global_generator() if isinstance(obj, TFGlobalRNG) else obj

    def save(self, obj: Any) -> Any:
        gen = self._gen(obj)
        return {"algorithm": int(gen.algorithm), "state": gen.state}

    def load(self, obj: Any, tree: Any) -> Any:
        gen = self._gen(obj)
        if int(tree["algorithm"]) != int(gen.algorithm):
            raise StateMismatchError(
                f"tf.random.Generator: the checkpoint used RNG algorithm {tree['algorithm']}, the "
                f"registered generator uses {int(gen.algorithm)}; create it with the same `alg`")
        assign(gen.state, tree["state"], "tf.random.Generator state")
        return obj


def _is_tf_iterator(obj: Any) -> bool:
    return isinstance(obj, tf.data.Iterator) and callable(getattr(obj, "_save", None))


class IteratorAdapter(Adapter):
    """The position of a ``tf.data`` iterator (``iter(dataset)``), through TensorFlow's own
    iterator checkpointing: shuffle buffers and prefetched elements included, so the pipeline
    must be checkpointable (no ``py_function``, no external state unless the dataset's options
    say how to treat it)."""

    name = "tf.data.iterator"
    priority = 100
    per_rank = True

    def handles(self, obj: Any) -> bool:
        return _is_tf_iterator(obj)

    def save(self, obj: Any) -> Any:
        with tf.init_scope():
            state = obj._save().numpy()  # ASCII: base64 pieces of the serialized iterator
        # a string, not an array: its size changes as the pipeline's buffers fill and drain
        return {"iterator_state": state.decode("ascii")}

    def load(self, obj: Any, tree: Any) -> Any:
        state = tree["iterator_state"].encode("ascii")
        try:
            with tf.init_scope():
                obj._restore(tf.constant(state))
        except tf.errors.OpError as exc:
            raise StateMismatchError(
                f"tf.data iterator: the saved position does not fit this pipeline ({exc.message.strip()}); "
                "build the same dataset (same transformations and options) before registering it"
            ) from None
        return obj


ARRAY_CODECS = [TFCodec()]
ADAPTERS = [VariableAdapter, ModuleAdapter, GeneratorAdapter, IteratorAdapter, *_keras.ADAPTERS]
