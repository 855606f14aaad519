"""Array leaves: the dtype table and the codecs that copy arrays in and out of host bytes.

The core knows numpy; frameworks (torch, jax, tf) add a codec from their adapter module.
A codec never pickles: an array is its dtype name, its shape and its raw little-endian
bytes, which is exactly what a safetensors file stores.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol, runtime_checkable

import numpy as np

# dtype name -> (itemsize, safetensors dtype or None when safetensors has no such type).
DTYPES: dict[str, tuple[int, str | None]] = {
    "float64": (8, "F64"), "float32": (4, "F32"), "float16": (2, "F16"), "bfloat16": (2, "BF16"),
    "int64": (8, "I64"), "int32": (4, "I32"), "int16": (2, "I16"), "int8": (1, "I8"),
    "uint64": (8, "U64"), "uint32": (4, "U32"), "uint16": (2, "U16"), "uint8": (1, "U8"),
    "bool": (1, "BOOL"), "complex64": (8, "C64"), "complex128": (16, None),
    "float8_e4m3fn": (1, "F8_E4M3"), "float8_e5m2": (1, "F8_E5M2"),
    "float8_e4m3fnuz": (1, "F8_E4M3FNUZ"), "float8_e5m2fnuz": (1, "F8_E5M2FNUZ"),
    # ml_dtypes types (JAX) that safetensors has no exact type for: stored as U8 bytes, one byte
    # per element as numpy holds them (sub-byte ints and float4/float6 are not packed)
    "float8_e4m3": (1, None), "float8_e3m4": (1, None), "float8_e4m3b11fnuz": (1, None),
    "float8_e8m0fnu": (1, None), "float6_e2m3fn": (1, None), "float6_e3m2fn": (1, None),
    "float4_e2m1fn": (1, None), "int4": (1, None), "uint4": (1, None), "int2": (1, None),
    "uint2": (1, None),
}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("Lattice checkpoints are little-endian; big-endian hosts are not supported")


def itemsize(dtype: str) -> int:
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}") from None


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = itemsize(dtype)
    for d in shape:
        n *= d
    return n


@runtime_checkable
class ArrayCodec(Protocol):
    """How one array type (numpy, torch, ...) is snapshotted and restored.

    ``kind`` is recorded with each leaf so restore rebuilds the same type.
    """

    kind: str

    def handles(self, x: Any) -> bool: ...
    def describe(self, x: Any) -> tuple[str, tuple[int, ...]]:
        """Return (dtype name from ``DTYPES``, shape); raise ``TypeError`` for an unsupported dtype."""
    def copy_into(self, x: Any, dst: np.ndarray) -> None:
        """Copy the bytes of ``x`` (C order) into ``dst``, a 1-D uint8 array of exactly its size."""
    def byte_view(self, x: Any) -> np.ndarray | None:
        """A writable 1-D uint8 view of ``x``'s memory, or ``None`` if not on the host or not contiguous."""
    def empty(self, dtype: str, shape: tuple[int, ...]) -> Any:
        """A new host array whose ``byte_view`` is not ``None``."""

    # Optional: ``freeze(x) -> np.ndarray | None``, a host array with ``x``'s bytes (C order)
    # that training can no longer change, so the snapshot may copy it after ``checkpoint()``
    # returns; ``None`` when the codec cannot promise that (then it is copied at once).


class NumpyCodec:
    """numpy arrays and numpy scalars (restored as 0-d arrays' item)."""

    kind = "numpy"

    def handles(self, x: Any) -> bool:
        return isinstance(x, np.ndarray | np.generic)

    def describe(self, x: Any) -> tuple[str, tuple[int, ...]]:
        dt = np.asarray(x).dtype
        name = dt.name
        if name not in DTYPES or dt.byteorder == ">":
            raise TypeError(f"numpy dtype {dt} cannot be checkpointed (supported: {', '.join(DTYPES)})")
        return name, tuple(int(d) for d in np.shape(x))

    def copy_into(self, x: Any, dst: np.ndarray) -> None:
        a = np.asarray(x)
        if a.size:
            np.copyto(dst.view(a.dtype).reshape(a.shape), a, casting="no")

    def byte_view(self, x: Any) -> np.ndarray | None:
        if not isinstance(x, np.ndarray) or not x.flags.c_contiguous or not x.flags.writeable:
            return None
        return x.reshape(-1).view(np.uint8)

    def empty(self, dtype: str, shape: tuple[int, ...]) -> Any:
        return np.empty(shape, dtype=numpy_dtype(dtype))


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a Lattice dtype name (bfloat16 and float8 need ``ml_dtypes``)."""
    try:
        return np.dtype(name)
    except TypeError:
        pass
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy)

        return np.dtype(getattr(ml_dtypes, name))
    except (ImportError, AttributeError):
        raise TypeError(
            f"dtype {name!r} has no numpy equivalent here; `pip install ml_dtypes` to read it as numpy"
        ) from None


class Codecs:
    """The array codecs known to this process, numpy first; frameworks add theirs."""

    def __init__(self) -> None:
        self._codecs: list[ArrayCodec] = [NumpyCodec()]

    def add(self, codec: ArrayCodec) -> None:
        self._codecs = [c for c in self._codecs if c.kind != codec.kind] + [codec]

    def find(self, x: Any) -> ArrayCodec | None:
        for codec in reversed(self._codecs):
            if codec.handles(x):
                return codec
        return None

    def by_kind(self, kind: str) -> ArrayCodec | None:
        for codec in self._codecs:
            if codec.kind == kind:
                return codec
        return None


CODECS = Codecs()
