"""The handle ``lattice.register`` returns: registered objects and plain values as attributes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session


class State:
    """Attribute access to registered items: ``state.model``, ``state.epoch += 1``.

    ``state.step`` is the step count (restored on resume, advanced by ``lattice.step()``);
    ``state.restored_from`` is the checkpoint directory restored at start, or ``None``.
    """

    __slots__ = ("_session",)

    def __init__(self, session: Session):
        object.__setattr__(self, "_session", session)

    @property
    def step(self) -> int:
        return self._session.step

    @property
    def restored_from(self) -> str | None:
        r = self._session.restored
        return str(r.path) if r else None

    @property
    def items(self) -> list[str]:
        return [n for n in self._session.items if not n.startswith("_")]

    def __getattr__(self, name: str) -> Any:
        items = object.__getattribute__(self, "_session").items
        if name in items and not name.startswith("_"):
            return items[name].obj
        raise AttributeError(f"nothing registered as {name!r}; registered: {sorted(n for n in items if not n.startswith('_'))}")

    def __setattr__(self, name: str, value: Any) -> None:
        items = self._session.items
        if name == "step":
            raise AttributeError("state.step is counted by lattice.step(); it cannot be assigned")
        if name not in items or name.startswith("_"):
            raise AttributeError(f"nothing registered as {name!r}; register it first: lattice.register({name}=...)")
        item = items[name]
        if not item.adapter.handles(value):
            raise TypeError(f"{name!r} is handled by adapter {item.adapter.name!r}, which cannot hold {type(value).__name__}")
        check = getattr(item.adapter, "check_replace", None)  # optional: e.g. JAX pytrees keep their structure
        if check is not None:
            check(item.obj, value, name)
        item.obj = value

    def __getitem__(self, name: str) -> Any:
        return self.__getattr__(name)

    def __repr__(self) -> str:
        return f"State(step={self.step}, items={self.items})"
