"""Static crops in a traced graph: ``x[:, :, a:-b, c:-d]`` read as the rows and columns it removes."""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch.fx as fx

from ..layers.geometry import Window

__all__ = ["crop_of"]


def _slice_bounds(item) -> Optional[Tuple[int, int]]:
    """(cropped at start, cropped at end) of a static slice with a start ≥ 0 and a stop ≤ 0 or None."""
    if not isinstance(item, slice) or item.step not in (None, 1):
        return None
    start, stop = item.start or 0, item.stop
    if not isinstance(start, int) or start < 0:
        return None
    if stop is None:
        return start, 0
    if isinstance(stop, int) and stop < 0:
        return start, -stop
    return None


def _four_dims(index) -> Optional[tuple]:
    """An NCHW index spelled out for all four dims (``x[..., a:b]``, ``x[:, :, a:b]``), or None."""
    if not isinstance(index, tuple):
        return None
    if index.count(Ellipsis) == 1:
        at = index.index(Ellipsis)
        fill = 4 - (len(index) - 1)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    elif len(index) < 4:
        index = index + (slice(None),) * (4 - len(index))
    return index if len(index) == 4 and Ellipsis not in index else None


def crop_of(node: fx.Node) -> Optional[Window]:
    """The crop a ``x[:, :, a:-b, c:-d]`` getitem node performs, or None if it is not one."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = _four_dims(node.args[1])
    if index is None or any(i != slice(None) for i in index[:2]):
        return None
    rows, cols = _slice_bounds(index[2]), _slice_bounds(index[3])
    if rows is None or cols is None:
        return None
    return Window(rows[0], rows[1], cols[0], cols[1])
