"""Find ACB subgraphs in a traced model: conv (→ BN) branches that read one input and are summed.

Matching only, by graph pattern (acfx's own ACBlock is recognised the same way as a hand-written one):

    source ─┬─ [crop] ─ conv ─ [BN] ─┐
            ├─ [crop] ─ conv ─ [BN] ─┼─ add ─ add ─ ...
            └─ ...                   ┘

The branches must line up: same stride, dilation, groups and channels, and kernels that fit in one
window when each branch's padding and crop are taken into account (geometry.Window).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .build import is_dynamic_same
from .geometry import Window, conv_window
from .norms import is_batch_norm

__all__ = ["ConvSpec", "Branch", "BranchSum", "find_branch_sums", "conv_spec"]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclasses.dataclass
class ConvSpec:
    """What fusion needs of a conv-like module."""

    # Returns the kernel the module convolves with ([C_out, C_in/groups, h, w]).
    weight: Callable[[], torch.Tensor]
    bias: Optional[torch.Tensor]
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    in_channels: int
    out_channels: int
    # The conv's own padding.
    window: Window
    padding_mode: str
    module: nn.Module


def conv_spec(module: nn.Module) -> Optional[ConvSpec]:
    """A plain nn.Conv2d, or a module exposing ``effective_weight()`` and conv attributes; else None."""
    if hasattr(module, "effective_weight"):
        if not all(hasattr(module, a) for a in ("padding", "padding_mode", "stride", "dilation", "groups",
                                                "in_channels", "out_channels", "bias")):
            return None
        weight = module.effective_weight
    elif type(module) is nn.Conv2d or (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
                                      and not is_dynamic_same(module)):
        weight = lambda: module.weight  # noqa: E731
    else:
        return None
    window = conv_window(module)
    if window is None:
        return None
    kernel = tuple(weight().shape[-2:])
    return ConvSpec(weight, module.bias, kernel, tuple(module.stride), tuple(module.dilation),
                    module.groups, module.in_channels, module.out_channels, window, module.padding_mode,
                    module)


def foldable_norm(module: nn.Module) -> bool:
    """A BN whose eval output is an affine map of its input (timm norm-act only with no drop/act)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    if type(module) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        children = dict(module.named_children())
        if any(type(c) is not nn.Identity for c in children.values()) or type(module).__name__ not in (
                "BatchNormAct2d", "SyncBatchNormAct"):
            return False
    return module.track_running_stats and module.running_var is not None


@dataclasses.dataclass
class Branch:
    """One summed term: [crop →] conv [→ BN]."""

    conv: fx.Node
    spec: ConvSpec
    norm: Optional[fx.Node]
    source: fx.Node
    # Rows/columns cropped from the source before the conv (non-negative amounts).
    crop: Window
    crop_node: Optional[fx.Node]
    # (row, col) of this branch's kernel in the fused kernel, set by alignment.
    offset: Tuple[int, int] = (0, 0)

    @property
    def nodes(self) -> List[fx.Node]:
        return [n for n in (self.crop_node, self.conv, self.norm) if n is not None]


@dataclasses.dataclass
class BranchSum:
    """A sum of ≥ 2 branches on one source, with where the fused conv would read."""

    output: fx.Node
    source: fx.Node
    branches: List[Branch]
    adds: List[fx.Node]
    # Why these branches cannot be fused; None when they can.
    reason: Optional[str] = None
    kernel_size: Tuple[int, int] = (0, 0)
    # The fused conv's window relative to ``source`` (negative sides: crops).
    window: Window = Window()

    @property
    def nodes(self) -> Set[fx.Node]:
        return set(self.adds).union(*(b.nodes for b in self.branches))


def _is_add(node: fx.Node) -> bool:
    if len(node.args) != 2 or node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _flatten_sum(node: fx.Node, live: Set[fx.Node]) -> Tuple[List[fx.Node], List[fx.Node]]:
    """The terms and the add nodes of the add tree rooted at ``node``."""
    terms, adds = [], [node]
    for arg in node.args:
        if not isinstance(arg, fx.Node):
            return [], []  # adding a constant: not a branch sum
        if _is_add(arg) and len([u for u in arg.users if u in live]) == 1:
            sub_terms, sub_adds = _flatten_sum(arg, live)
            if not sub_terms:
                return [], []
            terms += sub_terms
            adds += sub_adds
        else:
            terms.append(arg)
    return terms, adds


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


def _crop_of(node: fx.Node) -> Optional[Window]:
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


def _single_user(node: fx.Node, live: Set[fx.Node]) -> bool:
    return len([u for u in node.users if u in live]) == 1


def _parse_branch(term: fx.Node, modules: Dict[str, nn.Module], live: Set[fx.Node]) -> Optional[Branch]:
    node, norm = term, None
    if not _single_user(term, live):
        return None  # its value is also used outside the sum
    if node.op == "call_module" and is_batch_norm(modules[node.target]):
        if not foldable_norm(modules[node.target]) or len(node.args) != 1 or node.kwargs:
            return None
        norm, node = node, node.args[0]
        if not isinstance(node, fx.Node) or not _single_user(node, live):
            return None
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    spec = conv_spec(modules[node.target])
    if spec is None or not isinstance(node.args[0], fx.Node):
        return None
    source, crop, crop_node = node.args[0], Window(), None
    window = _crop_of(source)
    if window is not None:
        crop, crop_node, source = window, source, source.args[0]
    return Branch(node, spec, norm, source, crop, crop_node)


def _align_axis(starts: Sequence[int], ends: Sequence[int], sizes: Sequence[int], dilation: int):
    """Offsets in the fused kernel, its size and its (start, end) padding along one axis, or None."""
    first = max(starts)
    if any((first - s) % dilation for s in starts):
        return None
    offsets = [(first - s) // dilation for s in starts]
    spans = {s + e - dilation * (k - 1) for s, e, k in zip(starts, ends, sizes)}
    if len(spans) != 1:
        return None  # branch outputs would differ in size
    size = max(o + k for o, k in zip(offsets, sizes))
    return offsets, size, (first, spans.pop() + dilation * (size - 1) - first)


def _align(match: BranchSum) -> Optional[str]:
    """Fill in the fused kernel's size, window and each branch's offset; or say why it cannot be done."""
    specs = [b.spec for b in match.branches]
    for attr in ("stride", "dilation", "groups", "in_channels", "out_channels"):
        if len({getattr(s, attr) for s in specs}) != 1:
            return f"branches differ in {attr}"
    for branch in match.branches:
        if branch.spec.padding_mode != "zeros" and not branch.spec.window.is_zero:
            return (f"branch conv pads with padding_mode={branch.spec.padding_mode!r}; only zero padding or a "
                    "padding shared before the branches can be fused")
    windows = [b.spec.window - b.crop for b in match.branches]
    dil = specs[0].dilation
    rows = _align_axis([w.top for w in windows], [w.bottom for w in windows],
                       [s.kernel_size[0] for s in specs], dil[0])
    cols = _align_axis([w.left for w in windows], [w.right for w in windows],
                       [s.kernel_size[1] for s in specs], dil[1])
    if rows is None or cols is None:
        return "branch kernels do not fit in one sliding window (paddings, crops and kernel sizes disagree)"
    for branch, row, col in zip(match.branches, rows[0], cols[0]):
        branch.offset = (row, col)
    match.kernel_size = (rows[1], cols[1])
    match.window = Window(rows[2][0], rows[2][1], cols[2][0], cols[2][1])
    return None


def find_branch_sums(graph: fx.Graph, modules: Dict[str, nn.Module], live: Set[fx.Node]) -> List[BranchSum]:
    """Every maximal sum of ≥ 2 conv branches on one source; ``reason`` says if it cannot be fused."""
    matches = []
    for node in graph.nodes:
        if node not in live or not _is_add(node):
            continue
        users = [u for u in node.users if u in live]
        if len(users) == 1 and _is_add(users[0]):
            continue  # an inner add of a larger sum
        terms, adds = _flatten_sum(node, live)
        branches = [_parse_branch(t, modules, live) for t in terms]
        found = [b for b in branches if b is not None]
        if len(found) < 2 or len({b.source for b in found}) != 1:
            continue  # not a block: e.g. a residual sum of two different inputs
        match = BranchSum(node, found[0].source, found, adds)
        if len(found) < len(terms):
            match.reason = "the sum also adds terms that are not conv branches of the same input"
        elif len({b.conv.target for b in found}) < len(found):
            match.reason = "one conv module is used by several branches"
        else:
            match.reason = _align(match)
        matches.append(match)
    return matches
