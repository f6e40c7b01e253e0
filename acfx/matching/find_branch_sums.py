"""Find ACB subgraphs in a traced model: conv (→ BN) branches that read one input and are summed.

Matching only, by graph pattern (acfx's own ACBlock is recognised the same way as a hand-written one):

    source ─┬─ [crop] ─ conv ─ [BN] ─┐
            ├─ [crop] ─ conv ─ [BN] ─┼─ add ─ add ─ ...
            └─ ...                   ┘

nn.Identity calls anywhere on a branch are looked through, and adding the constant 0 is ignored. A sum
with at least two conv branches on one input is a block; each is returned as a complete record: either
fusable, with its alignment (the fused kernel's size and window, each branch's offset), or with the
reason it is not. The branches must line up: same stride, dilation, groups and channels, and kernels
that fit in one window when each branch's padding and crop are taken into account (geometry.Window).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..layers.convs import PLAIN, conv_kind, kernel_of, other_conv_reason, unknown_conv_reason
from ..layers.geometry import Window, conv_window
from ..layers.norms import foldable_norm, is_batch_norm
from ..layers.split_conv import EvenSplitConv2d

__all__ = ["ConvSpec", "Branch", "Alignment", "BranchSum", "find_branch_sums", "conv_spec"]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclasses.dataclass(frozen=True)
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


def _conv_reason(module: nn.Module) -> Optional[str]:
    """Why a conv-like module cannot be a fused branch (None: it can)."""
    if isinstance(module, EvenSplitConv2d):
        return None
    if not isinstance(module, nn.Conv2d):
        return other_conv_reason(module) or f"{type(module).__name__} is not a conv acfx knows"
    reason = unknown_conv_reason(module)
    if reason:
        return reason
    if conv_kind(module) != PLAIN:
        return (f"{type(module).__name__} pads by the input size at run time (TF 'same'), which one branch of "
                "a sum cannot share with the others")
    if conv_window(module) is None:
        return f"padding={module.padding!r} cannot be resolved"
    return None


def conv_spec(module: nn.Module) -> Optional[ConvSpec]:
    """The spec of a conv acfx knows (nn.Conv2d's own computation, or acfx's EvenSplitConv2d); else None."""
    if _conv_reason(module) is not None:
        return None
    weight = lambda: kernel_of(module)  # noqa: E731
    kernel = tuple(weight().shape[-2:])
    return ConvSpec(weight, module.bias, kernel, tuple(module.stride), tuple(module.dilation), module.groups,
                    module.in_channels, module.out_channels, conv_window(module), module.padding_mode, module)


@dataclasses.dataclass(frozen=True)
class Branch:
    """One summed term: [crop →] conv [→ BN], with the nodes it is made of."""

    conv: fx.Node
    module: nn.Module
    # None when the conv is not one acfx can fuse (``reason`` says why).
    spec: Optional[ConvSpec]
    norm: Optional[fx.Node]
    source: fx.Node
    # Rows/columns cropped from the source before the conv (non-negative amounts).
    crop: Window
    # Every node of the branch: crop, identities, conv, BN.
    nodes: Tuple[fx.Node, ...]
    reason: Optional[str] = None

    @property
    def kernel_text(self) -> str:
        size = self.spec.kernel_size if self.spec is not None else tuple(getattr(self.module, "kernel_size", ()))
        return "x".join(map(str, size)) or type(self.module).__name__


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Where the branches of a fusable sum sit in one kernel."""

    kernel_size: Tuple[int, int]
    # The fused conv's window relative to the sum's source (negative sides: crops).
    window: Window
    # (row, col) of each branch's kernel in the fused kernel, in branch order.
    offsets: Tuple[Tuple[int, int], ...]
    # The padding mode the branches pad with (zeros unless they all pad the same other way).
    padding_mode: str = "zeros"


@dataclasses.dataclass(frozen=True)
class BranchSum:
    """A sum of ≥ 2 conv branches on one source: fusable (``alignment``) or not (``reason``)."""

    output: fx.Node
    source: fx.Node
    branches: Tuple[Branch, ...]
    adds: Tuple[fx.Node, ...]
    # Why these branches cannot be fused; None when they can.
    reason: Optional[str]
    alignment: Optional[Alignment]

    @property
    def nodes(self) -> Set[fx.Node]:
        return set(self.adds).union(*(b.nodes for b in self.branches))


def _is_add(node: fx.Node) -> bool:
    if len(node.args) != 2 or node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _live_users(node: fx.Node, live: Set[fx.Node]) -> List[fx.Node]:
    return [u for u in node.users if u in live]


def _flatten_sum(node: fx.Node, live: Set[fx.Node]) -> Tuple[List[fx.Node], List[object], List[fx.Node]]:
    """The node terms, the constant terms and the add nodes of the add tree rooted at ``node``."""
    terms: List[fx.Node] = []
    constants: List[object] = []
    adds = [node]
    for arg in node.args:
        if not isinstance(arg, fx.Node):
            constants.append(arg)
        elif _is_add(arg) and len(_live_users(arg, live)) == 1:
            sub_terms, sub_constants, sub_adds = _flatten_sum(arg, live)
            terms += sub_terms
            constants += sub_constants
            adds += sub_adds
        else:
            terms.append(arg)
    return terms, constants, adds


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


class _Walker:
    """Walks a term back to its conv and its source, looking through nn.Identity calls."""

    def __init__(self, modules: Dict[str, nn.Module], live: Set[fx.Node]) -> None:
        self.modules, self.live = modules, live

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _one_input(self, node: fx.Node) -> Optional[fx.Node]:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        return node.args[0]

    def through_identities(self, node: fx.Node, nodes: List[fx.Node]) -> fx.Node:
        """What ``node`` passes on unchanged through nn.Identity calls whose value is used only there."""
        while isinstance(self.module(node), nn.Identity) and len(_live_users(node, self.live)) == 1:
            inner = self._one_input(node)
            if inner is None:
                break
            nodes.append(node)
            node = inner
        return node

    def _source(self, conv: fx.Node, nodes: List[fx.Node]) -> Optional[Tuple[fx.Node, Window]]:
        """(the input the branch reads, the crop it applies to it)."""
        source = self._one_input(conv)
        if source is None:
            return None
        source = self.through_identities(source, nodes)
        window = _crop_of(source)
        if window is None or len(_live_users(source, self.live)) != 1:
            return source, Window()
        nodes.append(source)
        return self.through_identities(source.args[0], nodes), window

    def branch(self, term: fx.Node) -> Optional[Branch]:
        """The conv branch ``term`` ends, or None when it is not one (or its values are used elsewhere)."""
        if len(_live_users(term, self.live)) != 1:
            return None
        nodes: List[fx.Node] = []
        node, norm, reason = self.through_identities(term, nodes), None, None
        module = self.module(node)
        if module is not None and is_batch_norm(module):
            norm = node
            if not foldable_norm(module):
                reason = f"branch norm {type(module).__name__} is not an affine map in eval (drop/act or no statistics)"
            node = self._one_input(node)
            if node is None or len(_live_users(node, self.live)) != 1:
                return None
            node = self.through_identities(node, nodes)
            module = self.module(node)
        if not isinstance(module, (nn.modules.conv._ConvNd, EvenSplitConv2d)) or len(_live_users(node, self.live)) != 1:
            return None
        found = self._source(node, nodes)
        if found is None:
            return None
        source, crop = found
        reason = reason or _conv_reason(module)
        spec = conv_spec(module) if reason is None else None
        return Branch(node, module, spec, norm, source, crop, tuple(nodes + [node] + ([norm] if norm else [])),
                      reason)


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


def _padding_mode(branches: Sequence[Branch]) -> Tuple[str, Optional[str]]:
    """The one padding mode of the branches that pad, or the reason there is none.

    A non-zero mode (reflect, replicate, circular) maps every padded index back into the input, per axis:
    branches padding the same way on an axis they do not crop read what one conv padding that way reads.
    """
    padding = [b for b in branches if not b.spec.window.positive().is_zero]
    modes = {b.spec.padding_mode for b in padding}
    if len(modes) > 1:
        return "zeros", f"branches pad in different modes {sorted(modes)}"
    mode = modes.pop() if modes else "zeros"
    if mode == "zeros":
        return mode, None
    for b in padding:
        pad, crop = b.spec.window, b.crop
        if (pad.top > 0 or pad.bottom > 0) and (crop.top or crop.bottom) or \
                (pad.left > 0 or pad.right > 0) and (crop.left or crop.right):
            return mode, (f"a branch crops its input and pads it with padding_mode={mode!r} along the same axis; "
                          "one conv cannot read that")
    return mode, None


def _align(branches: Sequence[Branch]) -> Tuple[Optional[Alignment], Optional[str]]:
    """The alignment of fusable branches, or why they do not line up."""
    specs = [b.spec for b in branches]
    for attr in ("stride", "dilation", "groups", "in_channels", "out_channels"):
        if len({getattr(s, attr) for s in specs}) != 1:
            return None, f"branches differ in {attr}"
    mode, reason = _padding_mode(branches)
    if reason:
        return None, reason
    windows = [b.spec.window - b.crop for b in branches]
    dil = specs[0].dilation
    rows = _align_axis([w.top for w in windows], [w.bottom for w in windows],
                       [s.kernel_size[0] for s in specs], dil[0])
    cols = _align_axis([w.left for w in windows], [w.right for w in windows],
                       [s.kernel_size[1] for s in specs], dil[1])
    if rows is None or cols is None:
        return None, "branch kernels do not fit in one sliding window (paddings, crops and kernel sizes disagree)"
    window = Window(rows[2][0], rows[2][1], cols[2][0], cols[2][1])
    return Alignment((rows[1], cols[1]), window, tuple(zip(rows[0], cols[0])), mode), None


def _describe_term(node: fx.Node, walker: _Walker, source: fx.Node) -> str:
    if node is source:
        return "the input itself (an identity branch)"
    module = walker.module(node)
    if module is not None:
        if is_batch_norm(module) and node.args and node.args[0] is source:
            return f"an identity branch ({type(module).__name__} of the input)"
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))


def _sum_reason(constants: List[object], others: List[str], branches: Sequence[Branch]) -> Optional[str]:
    if constants:
        return f"the sum also adds the constant {constants[0]!r}"
    if others:
        return (f"the sum also adds terms that are not conv branches of the same input ({', '.join(others)}); "
                "acfx fuses sums of conv(→BN) branches only")
    for branch in branches:
        if branch.reason:
            return branch.reason
    if len({b.conv.target for b in branches}) < len(branches):
        return "one conv module is used by several branches"
    return None


def find_branch_sums(graph: fx.Graph, modules: Dict[str, nn.Module], live: Set[fx.Node]) -> List[BranchSum]:
    """Every maximal sum with ≥ 2 conv branches on one source; ``reason`` says if it cannot be fused.

    Sums whose conv branches all read different inputs (a residual connection) are not blocks and are not
    returned.
    """
    walker = _Walker(modules, live)
    matches = []
    for node in graph.nodes:
        if node not in live or not _is_add(node):
            continue
        users = _live_users(node, live)
        if len(users) == 1 and _is_add(users[0]):
            continue  # an inner add of a larger sum
        terms, constants, adds = _flatten_sum(node, live)
        constants = [c for c in constants if not (isinstance(c, (int, float)) and c == 0)]
        parsed = [(t, walker.branch(t)) for t in terms]
        groups: Dict[fx.Node, List[Branch]] = {}
        for _, branch in parsed:
            if branch is not None:
                groups.setdefault(branch.source, []).append(branch)
        if not groups:
            continue
        source, branches = max(groups.items(), key=lambda item: len(item[1]))
        if len(branches) < 2:
            continue  # not a block: e.g. a residual sum of two different inputs
        others = [("conv branch on another input" if b is not None else _describe_term(t, walker, source))
                  for t, b in parsed if b is None or b.source is not source]
        reason = _sum_reason(constants, others, branches)
        alignment = None
        if reason is None:
            alignment, reason = _align(branches)
        matches.append(BranchSum(node, source, tuple(branches), tuple(adds), reason, alignment))
    return matches
