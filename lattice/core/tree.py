"""State trees <-> a JSON skeleton plus a list of array leaves.

Every container is tagged so decoding is unambiguous and nothing needs pickle:
lists are JSON arrays; dicts are ``{"$dict": [[key, value], ...]}`` (keys may be ints,
as in optimizer state); tuples ``{"$tuple": [...]}``; bytes ``{"$bytes": base64}``;
non-finite floats ``{"$float": "inf"}`` (a NaN also records its exact bits,
``{"$float": "nan", "bits": "<16 hex digits>"}``); arrays ``{"$array": index, ...}`` pointing into
the leaf list. Anything else is refused with the path of the offending value.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .arrays import CODECS, ArrayCodec, Codecs
from .errors import UnsupportedObjectError

Path = tuple[Any, ...]


@dataclasses.dataclass
class Leaf:
    """One array leaf found while encoding."""

    path: Path
    value: Any
    codec: ArrayCodec
    dtype: str
    shape: tuple[int, ...]


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path) if path else "<root>"


def encode(tree: Any, codecs: Codecs = CODECS, item: str = "") -> tuple[Any, list[Leaf]]:
    """Return the JSON-able skeleton of ``tree`` and its array leaves, in visit order."""
    leaves: list[Leaf] = []

    def enc(x: Any, path: Path) -> Any:
        if x is None or isinstance(x, bool | str):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float) and not isinstance(x, np.generic):  # np.float64 is a float: keep its type
            if math.isfinite(x):
                return float(x)
            if math.isnan(x):  # keep the sign and payload of a NaN: its exact bits
                return {"$float": "nan", "bits": struct.pack(">d", x).hex()}
            return {"$float": repr(float(x))}
        if isinstance(x, list):
            return [enc(v, path + (i,)) for i, v in enumerate(x)]
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return {"$tuple": [enc(v, path + (i,)) for i, v in enumerate(x)]}
        if isinstance(x, dict):
            return {"$dict": [[enc(k, path + ("<key>",)), enc(v, path + (k,))] for k, v in x.items()]}
        if isinstance(x, bytes | bytearray):
            return {"$bytes": base64.b64encode(bytes(x)).decode("ascii")}
        codec = codecs.find(x)
        if codec is None:
            raise UnsupportedObjectError(
                f"cannot checkpoint {type(x).__module__}.{type(x).__qualname__} at "
                f"{item}/{path_str(path)}: supported leaves are None, bool, int, float, str, bytes, "
                "list, tuple, dict and arrays (numpy, or a framework whose adapter is loaded); register "
                "such an object by itself, with an adapter for its type (see docs/adapters.md)"
            )
        try:
            dtype, shape = codec.describe(x)
        except TypeError as exc:
            raise UnsupportedObjectError(f"{item}/{path_str(path)}: {exc}") from None
        leaves.append(Leaf(path, x, codec, dtype, shape))
        node = {"$array": len(leaves) - 1, "kind": codec.kind, "dtype": dtype, "shape": list(shape)}
        if isinstance(x, np.generic):
            node["scalar"] = True
        return node

    return enc(tree, ()), leaves


def array_nodes(skeleton: Any, path: Path = ()) -> Iterator[tuple[Path, dict]]:
    """Yield (path, array node) for every array in a skeleton, in encoding order."""
    if isinstance(skeleton, list):
        for i, v in enumerate(skeleton):
            yield from array_nodes(v, path + (i,))
    elif isinstance(skeleton, dict):
        if "$array" in skeleton:
            yield path, skeleton
        elif "$tuple" in skeleton:
            for i, v in enumerate(skeleton["$tuple"]):
                yield from array_nodes(v, path + (i,))
        elif "$dict" in skeleton:
            for k, v in skeleton["$dict"]:
                yield from array_nodes(v, path + (decode(k, _no_arrays),))


def _no_arrays(node: dict) -> Any:
    raise ValueError("array used as a dict key")


def decode(skeleton: Any, array: Callable[[dict], Any]) -> Any:
    """Rebuild a tree; ``array(node)`` supplies the value of each array node."""
    if isinstance(skeleton, list):
        return [decode(v, array) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "$array" in skeleton:
        return array(skeleton)
    if "$dict" in skeleton:
        return {decode(k, array): decode(v, array) for k, v in skeleton["$dict"]}
    if "$tuple" in skeleton:
        return tuple(decode(v, array) for v in skeleton["$tuple"])
    if "$bytes" in skeleton:
        return base64.b64decode(skeleton["$bytes"])
    if "$float" in skeleton:
        if "bits" in skeleton:
            return struct.unpack(">d", bytes.fromhex(skeleton["bits"]))[0]
        return float(skeleton["$float"])
    raise ValueError(f"unknown node in checkpoint tree: {sorted(skeleton)}")


def live_arrays(tree: Any, codecs: Codecs = CODECS) -> dict[Path, Any]:
    """Map path -> array for the arrays currently in a live tree (restore targets)."""
    out: dict[Path, Any] = {}

    def walk(x: Any, path: Path) -> None:
        if isinstance(x, list | tuple) and not hasattr(x, "_fields"):
            for i, v in enumerate(x):
                walk(v, path + (i,))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, path + (k,))
        elif x is not None and not isinstance(x, bool | int | float | str | bytes) and codecs.find(x):
            out[path] = x

    walk(tree, ())
    return out
