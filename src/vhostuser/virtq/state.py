"""State blocks: a ring's (or tracker's) mutable indices in one ``array('q')``. No I/O.

The compiled engine reads and writes these blocks in place, so each index lives in one
place that both engines share. :class:`StateField` names one slot of an object's block
(its ``_st`` attribute) as an ordinary attribute for the Python code.
"""

from __future__ import annotations

from typing import Any, overload

__all__ = ["StateField"]


class StateField:
    """Attribute access to slot ``index`` of the owner's ``_st`` block (an int)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> StateField: ...

    @overload
    def __get__(self, obj: object, owner: type[Any]) -> int: ...

    def __get__(self, obj: object | None, owner: type[Any]) -> StateField | int:
        if obj is None:
            return self
        value: int = obj._st[self.index]  # type: ignore[attr-defined]
        return value

    def __set__(self, obj: object, value: int) -> None:
        obj._st[self.index] = value  # type: ignore[attr-defined]
