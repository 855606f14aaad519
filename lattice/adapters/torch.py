"""PyTorch adapters: modules, optimizers, LR schedulers, GradScaler, tensors, RNG state,
and the position of a ``DataLoader`` in its epoch.

Tensors are snapshotted by ``copy_`` into the host buffer and restored by reading the
file straight into a module's own parameter and buffer storage when shapes match.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..core.adapter import Adapter
from ..core.errors import StateMismatchError
from .torch_data import DataLoaderAdapter
from .torch_elastic import ElasticSamplerAdapter

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
    torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32", torch.int16: "int16",
    torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool", torch.complex64: "complex64",
    torch.complex128: "complex128",
}
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _name
_BY_NAME = {v: k for k, v in _DTYPES.items()}


class TorchCodec:
    """torch.Tensor leaves (any device; restored on the CPU unless read into a live tensor)."""

    kind = "torch"

    def handles(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def describe(self, x: Any) -> tuple[str, tuple[int, ...]]:
        if x.layout != torch.strided or x.is_quantized or getattr(x, "is_nested", False):
            raise TypeError(f"{x.layout} / quantized / nested tensors cannot be checkpointed; convert to dense first")
        if x.device.type == "meta":
            raise TypeError("a tensor on the 'meta' device has no data to checkpoint")
        if x.dtype not in _DTYPES:
            raise TypeError(f"torch dtype {x.dtype} is not supported (supported: {', '.join(_DTYPES.values())})")
        return _DTYPES[x.dtype], tuple(x.shape)

    def copy_into(self, x: Any, dst: np.ndarray) -> None:
        src = x.detach()
        if src.is_conj():
            src = src.resolve_conj()
        if src.is_neg():
            src = src.resolve_neg()
        torch.from_numpy(dst).view(src.dtype).view(src.shape).copy_(src)

    def byte_view(self, x: Any) -> np.ndarray | None:
        if x.device.type != "cpu" or not x.is_contiguous() or x.is_conj() or x.is_neg():
            return None
        if x.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        # as_strided, not view(-1): a contiguous tensor may still have a non-unit stride on a
        # size-1 dimension (e.g. ``t[::2]`` of two elements), which view(torch.uint8) refuses
        flat = x.detach().as_strided((x.numel(),), (1,), x.storage_offset())
        return flat.view(torch.uint8).numpy()

    def empty(self, dtype: str, shape: tuple[int, ...]) -> Any:
        return torch.empty(shape, dtype=_BY_NAME[dtype])


def _same_memory(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device
            and (a.numel() == 0 or a.data_ptr() == b.data_ptr()))


class ModuleAdapter(Adapter):
    """``nn.Module``: parameters, buffers and extra state, through ``state_dict``."""

    name = "torch.module"
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.nn.Module)

    def save(self, obj: Any) -> Any:
        return obj.state_dict()

    def load(self, obj: Any, tree: Any) -> Any:
        live = obj.state_dict()
        missing, unexpected = sorted(set(live) - set(tree)), sorted(set(tree) - set(live))
        if missing or unexpected:
            raise StateMismatchError(
                f"module {type(obj).__name__} does not match the checkpoint: missing from the checkpoint "
                f"{missing[:10]}, not in the module {unexpected[:10]}"
            )
        if all(_same_memory(live[k], v) for k, v in tree.items()):
            return obj  # every tensor was read straight into the module's own storage
        obj.load_state_dict(tree, strict=True)
        return obj


class _StateDictAdapter(Adapter):
    priority = 100
    kinds: tuple[type, ...] = ()

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, self.kinds)

    def save(self, obj: Any) -> Any:
        return obj.state_dict()

    def load(self, obj: Any, tree: Any) -> Any:
        obj.load_state_dict(tree)
        return obj


class OptimizerAdapter(_StateDictAdapter):
    """``torch.optim.Optimizer``: per-parameter state (e.g. Adam moments) and param groups."""

    name = "torch.optimizer"
    kinds = (torch.optim.Optimizer,)


class SchedulerAdapter(_StateDictAdapter):
    """LR schedulers (``LRScheduler`` subclasses and ``ReduceLROnPlateau``)."""

    name = "torch.lr_scheduler"
    kinds = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


class GradScalerAdapter(_StateDictAdapter):
    """``torch.amp.GradScaler`` (and the older ``torch.cuda.amp.GradScaler``)."""

    name = "torch.grad_scaler"
    kinds = (torch.amp.GradScaler,)


class TensorAdapter(Adapter):
    """A bare tensor or ``nn.Parameter``, restored in place (its identity is kept)."""

    name = "torch.tensor"
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, torch.Tensor)

    def save(self, obj: Any) -> Any:
        return obj

    def load(self, obj: Any, tree: Any) -> Any:
        if tree is not obj:
            with torch.no_grad():
                obj.copy_(tree)
        return obj


class TorchRNG:
    """torch's global RNG state, CPU and (when initialized) CUDA; registered automatically."""


class TorchRNGAdapter(Adapter):
    name = "torch.rng"
    per_rank = True  # each rank has its own
    priority = 100

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, TorchRNG)

    def save(self, obj: Any) -> Any:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load(self, obj: Any, tree: Any) -> Any:
        torch.set_rng_state(tree["cpu"])
        if "cuda" in tree and torch.cuda.is_available():
            n = min(len(tree["cuda"]), torch.cuda.device_count())
            torch.cuda.set_rng_state_all(tree["cuda"][:n])
        return obj


ARRAY_CODECS = [TorchCodec()]
ADAPTERS = [ModuleAdapter, OptimizerAdapter, SchedulerAdapter, GradScalerAdapter, TensorAdapter,
            TorchRNGAdapter, DataLoaderAdapter, ElasticSamplerAdapter]
