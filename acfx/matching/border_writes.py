"""A zero pad whose border is then written in place with a per-channel value, read as one pad with that value.

Re-parameterisable blocks that put a 1×1 conv with a bias before a k×k conv (ECBSR's edge-oriented block,
DBB's 1×1→k×k branch) pad the 1×1's output with its bias, not with zeros, so that the branch is one conv
reading a zero-padded input. Code writes that as a zero pad followed by assignments into its border::

    y = F.pad(y, (1, 1, 1, 1), "constant", 0)
    y[:, :, 0:1, :] = b
    y[:, :, -1:, :] = b
    y[:, :, :, 0:1] = b
    y[:, :, :, -1:] = b

fx cannot trace item assignment. When collapse traces a model, assignments are recorded as
``operator.setitem`` nodes (``AssignableProxy``); each pad whose assignments are exactly such a frame (every
band of the pad written, with one value, before anything else reads the pad) becomes one call of
:func:`pad_with_value`, which computes the same thing without writing in place. Any other assignment makes
the module untraced, as if fx had refused it: an in-place write is never guessed at.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..layers.padding import PAD_FUNCTIONS

__all__ = ["AssignableProxy", "pad_with_value", "fold_border_writes", "UnfoldedWrite"]

_MARK = "acfx_item_assignment"


class UnfoldedWrite(Exception):
    """An item assignment that is not a border fill of a pad: the module is left untraced."""


class AssignableProxy(fx.Proxy):
    """A Proxy that records ``t[index] = value`` as an ``operator.setitem`` node (fx's own Proxy refuses)."""

    def __setitem__(self, index, value) -> None:
        proxy = self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})
        proxy.node.meta[_MARK] = True


def pad_with_value(x: torch.Tensor, pad: Sequence[int], value: torch.Tensor) -> torch.Tensor:
    """``x`` padded by ``pad`` ((left, right, top, bottom)) with ``value`` (broadcast over the border)."""
    left, right, top, bottom = pad
    padded = F.pad(x, tuple(pad))
    height, width = padded.shape[-2:]
    inner = torch.zeros(height, width, dtype=torch.bool, device=x.device)
    inner[top:height - bottom, left:width - right] = True
    return torch.where(inner, padded, value.to(padded.dtype).expand_as(padded))


def _band(index: slice) -> Optional[Tuple[str, int]]:
    """("start", n) for ``0:n`` / ``:n``, ("end", n) for ``-n:``; None for any other slice."""
    if not isinstance(index, slice) or index.step not in (None, 1):
        return None
    start, stop = index.start, index.stop
    if start in (None, 0) and isinstance(stop, int) and stop > 0:
        return "start", stop
    if isinstance(start, int) and start < 0 and stop is None:
        return "end", -start
    return None


def _written_band(index) -> Optional[Tuple[str, int]]:
    """Which band of the border an index of a 4-d map selects: ("top"|"bottom"|"left"|"right", width)."""
    if not isinstance(index, tuple):
        return None
    if len(index) == 3 and index[0] is Ellipsis:
        index = (slice(None), slice(None)) + index[1:]
    full = slice(None, None, None)
    if len(index) != 4 or index[0] != full or index[1] != full:
        return None
    rows, cols = index[2], index[3]
    if cols == full and _band(rows) is not None:
        side, width = _band(rows)
        return ("top" if side == "start" else "bottom"), width
    if rows == full and _band(cols) is not None:
        side, width = _band(cols)
        return ("left" if side == "start" else "right"), width
    return None


def _fold(pad: fx.Node, writes: List[fx.Node], order) -> bool:
    """Replace ``pad`` and its border ``writes`` by one pad_with_value call, if they are one frame."""
    amount = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    if mode != "constant" or not isinstance(amount, (tuple, list)) or len(amount) != 4 or \
            not all(isinstance(p, int) and p > 0 for p in amount):
        return False
    values = {w.args[2] for w in writes}
    if len(values) != 1 or not isinstance(next(iter(values)), fx.Node):
        return False
    left, right, top, bottom = amount
    wanted = {"left": left, "right": right, "top": top, "bottom": bottom}
    bands = {}
    for write in writes:
        band = _written_band(write.args[1])
        if band is None or wanted[band[0]] != band[1]:
            return False
        bands[band[0]] = band[1]
    last_write = max(order[w] for w in writes)
    readers = [u for u in pad.users if u not in writes]
    if bands != wanted or any(order[u] < last_write for u in readers):
        return False
    (value,) = values
    if _depends_on(value, pad):  # a value read off the pad itself (a replicate-style border): not a constant
        return False
    graph = pad.graph
    with graph.inserting_after(max(writes, key=order.__getitem__)):  # after the value, before any reader
        folded = graph.call_function(pad_with_value, (pad.args[0], tuple(amount), value))
    folded.meta.update(pad.meta)  # the module stack it was called in: which block it belongs to
    pad.replace_all_uses_with(folded, delete_user_cb=lambda user: user not in writes and user is not folded)
    for write in writes:
        graph.erase_node(write)
    graph.erase_node(pad)
    return True


def _depends_on(node: fx.Node, ancestor: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def fold_border_writes(graph: fx.Graph) -> None:
    """Fold each zero pad written into as a frame (see the module docstring); raise UnfoldedWrite if any
    recorded item assignment is left."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    writes = [n for n in graph.nodes if n.meta.get(_MARK)]
    if not writes:
        return
    by_target = {}
    for write in writes:
        by_target.setdefault(write.args[0], []).append(write)
    for target, group in by_target.items():
        if not (target.op == "call_function" and target.target in PAD_FUNCTIONS and _fold(target, group, order)):
            raise UnfoldedWrite(f"item assignment into {target.name} ('{target.format_node()[:80]}'): fx cannot "
                                "trace it, and acfx reads only a zero pad's border written with one value")
    graph.lint()
