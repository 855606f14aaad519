"""Property tests: any nested tree of tensors, numpy arrays and plain values round-trips
bit-exactly through a checkpoint on disk and a restore in a fresh session.

Values are compared by their bits, never by ``==`` (NaN payloads, -0.0, float8 and bool
bytes): arrays by dtype, shape and the bytes of a contiguous copy; floats by their IEEE
bytes; containers by type, order and keys.
"""

from __future__ import annotations

import itertools
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import lattice
from lattice.core import fmt

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
TORCH_DTYPES += [getattr(torch, n) for n in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
                                             "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)]
NUMPY_DTYPES = [np.dtype(n) for n in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                      "uint64", "uint32", "uint16", "uint8", "bool", "complex64", "complex128")]
# torch dtype -> the dtype safetensors reports (complex128 has no safetensors type: stored as U8)
SAFETENSORS_TORCH = {d: d for d in TORCH_DTYPES if d is not torch.complex128}

_counter = itertools.count()


def _dir(tmp_path: Path) -> Path:
    d = tmp_path / f"ex{next(_counter)}"
    d.mkdir()
    return d


# -- strategies ---------------------------------------------------------------------
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def raw_array(draw: Any, itemsize: int, is_bool: bool) -> tuple[np.ndarray, tuple[int, ...]]:
    """A C-contiguous uint8 buffer for ``shape`` with arbitrary bytes (0/1 for bool)."""
    shape = draw(shapes)
    n = math.prod(shape) * itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    buf = np.frombuffer(raw, dtype=np.uint8).copy()
    if is_bool:
        buf &= 1
    return buf, shape


@st.composite
def torch_tensors(draw: Any) -> torch.Tensor:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    itemsize = torch.empty((), dtype=dtype).element_size()
    buf, shape = draw(raw_array(itemsize, dtype is torch.bool))
    t = torch.from_numpy(buf).view(dtype).reshape(shape) if buf.size else torch.empty(shape, dtype=dtype)
    return draw(st.sampled_from(_views(t)))


def _views(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensor and non-contiguous / offset views of it."""
    out = [t]
    if t.dim() >= 2:
        out += [t.transpose(0, 1), t.mT]
    if t.dim() >= 1:
        out += [t[::2], t[1:], t.unsqueeze(0).expand(2, *t.shape)]
    if t.dim() >= 1 and t.shape[-1] > 1:
        out.append(t[..., ::3])
    if t.is_complex():
        out.append(t.conj())
    return out


@st.composite
def numpy_arrays(draw: Any) -> Any:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    buf, shape = draw(raw_array(dtype.itemsize, dtype == np.bool_))
    a = buf.view(dtype).reshape(shape)
    views = [a, np.asfortranarray(a)]
    if a.ndim >= 2:
        views.append(a.T)
    if a.ndim >= 1:
        views += [a[::2], a[::-1], a[1:]]
    if a.ndim == 0:
        views.append(a[()])  # a numpy scalar (np.generic)
    if a.size:
        ro = a.copy()
        ro.flags.writeable = False
        views.append(ro)
    return draw(st.sampled_from(views))


special_floats = st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324, -1.7976931348623157e308,
                                  struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]])
plain = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True), special_floats,
    st.text(max_size=12), st.text(alphabet=st.characters(min_codepoint=0x80), max_size=6),
    st.binary(max_size=24),
)
keys = st.one_of(st.text(max_size=8), st.integers(min_value=-(2**70), max_value=2**70))


def containers(children: Any) -> Any:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    )


leaves = st.one_of(plain, torch_tensors(), numpy_arrays())
trees = st.recursive(leaves, containers, max_leaves=12)
root_trees = containers(trees)  # a plain container at the root: registered as a python.value item


# -- bit-exact comparison -----------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> bytes:
    c = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach().resolve_conj().resolve_neg()).reshape(-1)
    return c.view(torch.uint8).numpy().tobytes() if c.numel() else b""


def assert_same(saved: Any, restored: Any, path: str = "x") -> None:
    if isinstance(saved, torch.Tensor):
        assert isinstance(restored, torch.Tensor), path
        assert restored.dtype == saved.dtype and restored.shape == saved.shape, path
        assert restored.device.type == "cpu", path
        assert tensor_bytes(restored) == tensor_bytes(saved), path
    elif isinstance(saved, np.ndarray):
        assert type(restored) is np.ndarray, path
        assert restored.dtype == saved.dtype and restored.shape == saved.shape, path
        assert np.ascontiguousarray(restored).tobytes() == np.ascontiguousarray(saved).tobytes(), path
    elif isinstance(saved, np.generic):
        assert type(restored) is type(saved), path
        assert restored.tobytes() == saved.tobytes(), path
    elif isinstance(saved, float):
        assert type(restored) is float, path
        assert struct.pack("<d", restored) == struct.pack("<d", saved), f"{path}: {saved!r} -> {restored!r}"
    elif isinstance(saved, dict):
        assert type(restored) is dict, path
        assert [(type(k), k) for k in restored] == [(type(k), k) for k in saved], path
        for k in saved:
            assert_same(saved[k], restored[k], f"{path}/{k!r}")
    elif isinstance(saved, list | tuple):
        assert type(restored) is type(saved) and len(restored) == len(saved), path
        for i, (a, b) in enumerate(zip(saved, restored, strict=True)):
            assert_same(a, b, f"{path}/{i}")
    else:
        assert type(restored) is type(saved) and restored == saved, f"{path}: {saved!r} -> {restored!r}"


def snapshot_bits(tree: Any) -> Any:
    """A deep, independent copy of ``tree`` to compare against (the session must not alias it)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().resolve_conj().clone()
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, dict):
        return {k: snapshot_bits(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [snapshot_bits(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(snapshot_bits(v) for v in tree)
    return tree


def save(d: Path, **items: Any) -> Path:
    s = lattice.new_session(checkpoint_dir=str(d), every_steps=None, capture_rng=False)
    try:
        s.register(items)
        s.checkpoint()
        path = s.wait()
    finally:
        s.close()
    assert path is not None and (path / fmt.MANIFEST).is_file()
    return path


def load(d: Path, **placeholders: Any) -> lattice.Session:
    s = lattice.new_session(checkpoint_dir=str(d), every_steps=None, capture_rng=False)
    s.register(placeholders)
    assert s.restored is not None, "nothing was restored"
    return s


# -- tests --------------------------------------------------------------------------
@pytest.mark.timeout(120)
@SETTINGS
@given(tree=root_trees, placeholder=st.sampled_from(["none", "empty"]))
def test_any_tree_roundtrips_bit_exactly(tmp_path: Path, tree: Any, placeholder: str) -> None:
    d = _dir(tmp_path)
    try:
        expected = snapshot_bits(tree)
        save(d, x=tree)
        assert_same(expected, tree)  # checkpointing did not touch the live tree
        ph = None if placeholder == "none" else type(tree)()
        s = load(d, x=ph)
        assert_same(expected, s.items["x"].obj)
        assert_same(expected, s.state.x)
        if isinstance(ph, dict | list):
            assert s.items["x"].obj is ph  # registered containers are updated in place
        s.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _like(x: Any) -> Any:
    """A registered target with x's structure, dtypes and shapes but other contents
    (including non-contiguous targets, which cannot be read into directly)."""
    if isinstance(x, torch.Tensor):
        if x.is_contiguous():
            return torch.zeros(x.shape, dtype=x.dtype)
        return torch.zeros((*x.shape, 2), dtype=x.dtype)[..., 0]  # same shape, not contiguous
    if isinstance(x, np.ndarray):
        a = np.zeros(x.shape, dtype=x.dtype)
        return a if x.flags.c_contiguous else np.asfortranarray(a)
    if isinstance(x, dict):
        return {k: _like(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_like(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_like(v) for v in x)
    return x


@pytest.mark.timeout(120)
@SETTINGS
@given(tree=st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(torch_tensors(), numpy_arrays()),
                            min_size=1, max_size=6),
       tensor=torch_tensors())
def test_restore_into_registered_arrays_bit_exactly(tmp_path: Path, tree: dict, tensor: torch.Tensor) -> None:
    """Restoring into live targets of the same shape/dtype (read in place, or copied when the
    target is not contiguous) gives the same bits as restoring into a fresh tree."""
    d = _dir(tmp_path)
    try:
        expected, expected_t = snapshot_bits(tree), tensor.detach().resolve_conj().clone()
        save(d, x=tree, t=tensor)
        target, target_t = _like(tree), _like(tensor)
        s = load(d, x=target, t=target_t)
        assert s.items["x"].obj is target and s.items["t"].obj is target_t  # restored in place
        assert_same(expected, target)
        assert_same(expected_t, target_t)
        s.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(120)
@SETTINGS
@given(leaves=st.lists(st.one_of(torch_tensors(), numpy_arrays()), min_size=1, max_size=8))
def test_data_file_is_valid_safetensors(tmp_path: Path, leaves: list[Any]) -> None:
    d = _dir(tmp_path)
    try:
        tree = {f"k{i}": v for i, v in enumerate(leaves)}
        expected = snapshot_bits(tree)
        path = save(d, x=tree)
        with safe_open(str(path / fmt.DATA), framework="pt") as f:
            assert f.metadata()["format"] == fmt.FORMAT and f.metadata()["step"] == "0"
            assert sorted(f.keys()) == sorted(f"x/{k}" for k in tree)
            for k, v in expected.items():
                got = f.get_tensor(f"x/{k}")
                if isinstance(v, torch.Tensor):
                    dtype, shape, raw = v.dtype, tuple(v.shape), tensor_bytes(v)
                else:
                    a = np.asarray(v)
                    dtype, shape, raw = torch.from_numpy(np.zeros(1, a.dtype)).dtype, a.shape, a.tobytes()
                if dtype in SAFETENSORS_TORCH:
                    assert got.dtype == SAFETENSORS_TORCH[dtype], k
                    assert tuple(got.shape) == tuple(shape), k
                else:  # no safetensors type: raw little-endian bytes
                    assert got.dtype == torch.uint8 and tuple(got.shape) == (len(raw),), k
                assert tensor_bytes(got) == raw, k
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(60)
def test_every_dtype_and_special_value_roundtrips(tmp_path: Path) -> None:
    """A fixed tree holding every dtype, 0-d, empty and non-contiguous arrays, and the plain
    values that are easiest to get wrong (so they are covered whatever hypothesis draws)."""
    tree: dict[Any, Any] = {}
    for dt in TORCH_DTYPES:
        itemsize = torch.empty((), dtype=dt).element_size()
        raw = torch.arange(24 * itemsize, dtype=torch.int64).mul(37).remainder(256).to(torch.uint8)
        if dt is torch.bool:
            raw = raw.remainder(2)
        t = raw.view(dt).reshape(4, 6)
        tree[str(dt)] = [t, t.t(), t[::2, 1::3], t[0, 0].clone(), torch.empty(0, 3, dtype=dt)]
    for dt in NUMPY_DTYPES:
        a = (np.arange(24 * dt.itemsize) * 37 % 256).astype(np.uint8)
        if dt == np.bool_:
            a %= 2
        a = a.view(dt).reshape(4, 6)
        tree[dt.name] = (a, a.T, a[::-2, ::3], a[0, 0].copy(), np.array(a[0, 0]), np.zeros((2, 0), dt))
    nan_neg = struct.unpack("<d", b"\x00\x00\x00\x00\x00\x00\xf8\xff")[0]
    nan_payload = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]
    tree["plain"] = {0: None, 3: True, 2: False, -(2**100): 2**200 + 1, "f": [0.0, -0.0, math.inf, -math.inf,
                     math.nan, nan_neg, nan_payload, 5e-324, 1e308], "s": ["", "ünï€😀", "\x00\n\""],
                     "b": [b"", b"\x00\xff" * 10], "t": (), "l": [], "d": {}, "1": "str key", 1: "int key"}
    expected = snapshot_bits(tree)
    save(tmp_path, x=tree)
    s = load(tmp_path, x=None)
    assert_same(expected, s.items["x"].obj)
    s.close()


@pytest.mark.timeout(60)
def test_restore_into_tensors_with_odd_strides(tmp_path: Path) -> None:
    """Targets that are contiguous but have a non-unit stride on a size-1 dimension (a
    regression: reading into them used to raise), plus transposed and offset targets."""
    saved = [torch.arange(1, dtype=torch.float64) + 0.5, torch.arange(6, dtype=torch.int32).reshape(3, 2),
             torch.arange(3, dtype=torch.bfloat16), torch.tensor([[True], [False]])]
    save(tmp_path, x=saved, t=saved[0].clone())
    targets = [torch.zeros(2, dtype=torch.float64)[::2], torch.zeros(2, 3, dtype=torch.int32).t(),
               torch.zeros(4, dtype=torch.bfloat16)[1:], torch.zeros(2, 2, dtype=torch.bool)[:, :1]]
    t = torch.zeros(2, dtype=torch.float64)[1:]
    assert targets[0].is_contiguous() and targets[0].stride() == (2,)
    s = load(tmp_path, x=targets, t=t)
    assert s.state.x is targets and s.state.t is t
    assert_same(saved, targets)
    assert_same(saved[0], t)
    s.close()
