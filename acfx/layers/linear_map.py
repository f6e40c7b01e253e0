"""The algebra of linear conv branches: one record for "a convolution of one input", and what it composes with.

Every branch of a re-parameterisable block is, once its BatchNorms use running statistics, a linear map of
the block's input: a convolution (with a bias) that reads some window of it. A sum of such maps over the
same sliding window is one convolution, and so is a pointwise (1×1) map followed by another convolution.
:class:`ConvMap` is that record; the operations here are what every recipe and every block kind reduces
to (Ding et al.: ACNet, Sect. 3.3; DBB, Sect. 3; OREPA):

* :meth:`ConvMap.then_affine`: a per-channel scale and shift after the map (an eval BN, a scale vector,
  YOLOv7's ImplicitM, or ImplicitA folded into the next conv's bias);
* :meth:`ConvMap.identity`, :meth:`ConvMap.avg_pool`: the identity and average pooling as convolutions;
* :func:`compose`: a pointwise map followed by a convolution (DBB's 1×1 → k×k and 1×1 → average branches),
  exact only where the padding between them pads with what the first map gives on the border; and any
  convolution followed by a 1×1 one that does not pad (ExpandNets' and SESR's k×k → 1×1);
* :func:`add`: maps over the same sliding window summed into one kernel (the ACB's three branches; kernels of
  different dilations are first spread out to a common one, UniRepLKNet's dilated re-parameterisation).

Nothing here needs a graph or a module: it is arithmetic on tensors in whatever dtype they come (fusion runs
it in float64 under no_grad; online re-parameterisation runs it with autograd every step). Each operation
returns a result or the reason it is not exact; nothing is ever approximated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .geometry import Window

__all__ = ["ConvMap", "Inexact", "compose", "add", "align"]

Pair = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Inexact:
    """Why an operation of the algebra has no exact result."""

    reason: str


@dataclasses.dataclass(frozen=True)
class ConvMap:
    """``y = conv(pad(x, window), kernel, stride, dilation, groups) + bias``: one linear map of one input.

    ``window`` is how the map reads its input: padding on each side, negative where it crops. Padding is
    with zeros (padding modes that reflect or repeat the input are applied to the input before the map).
    """

    kernel: torch.Tensor  # [C_out, C_in / groups, kh, kw]
    bias: Optional[torch.Tensor]  # [C_out], or None for no bias
    stride: Pair = (1, 1)
    dilation: Pair = (1, 1)
    groups: int = 1
    window: Window = Window()

    @property
    def in_channels(self) -> int:
        return self.kernel.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.kernel.shape[0]

    @property
    def kernel_size(self) -> Pair:
        return tuple(self.kernel.shape[-2:])

    @property
    def pointwise(self) -> bool:
        """A 1×1 map of stride 1: each output point reads one input point."""
        return self.kernel_size == (1, 1) and self.stride == (1, 1)

    def constant_response(self, value: torch.Tensor) -> torch.Tensor:
        """The output [C_out] where the window lies inside the input, for an input equal to ``value`` [C_in] at
        every position: each filter's taps summed, times the value, plus the bias."""
        taps = self.kernel.sum((2, 3))  # [C_out, C_in / groups]
        per_group = taps.view(self.groups, -1, taps.shape[1]) @ value.view(self.groups, -1, 1)
        out = per_group.reshape(-1)
        return out if self.bias is None else out + self.bias

    # -- constructors -----------------------------------------------------------------------------------
    @classmethod
    def identity(cls, channels: int, like: torch.Tensor) -> "ConvMap":
        """The identity of ``channels`` channels, as a depthwise 1×1 convolution with kernel 1."""
        return cls(torch.ones(channels, 1, 1, 1, dtype=like.dtype, device=like.device), None, groups=channels)

    @classmethod
    def avg_pool(cls, channels: int, kernel_size: Pair, stride: Pair, padding: Pair, like: torch.Tensor
                 ) -> "ConvMap":
        """``AvgPool2d(kernel_size, stride, padding)`` with count_include_pad=True (the zeros of its padding
        count), as a depthwise convolution with kernel 1/(kh·kw)."""
        kh, kw = kernel_size
        kernel = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=like.dtype, device=like.device)
        return cls(kernel, None, tuple(stride), (1, 1), channels, Window(padding[0], padding[0], padding[1], padding[1]))

    # -- transformations --------------------------------------------------------------------------------
    def then_affine(self, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> "ConvMap":
        """The map followed by ``y·scale + shift`` per output channel (either may be None: 1, 0)."""
        kernel, bias = self.kernel, self.bias
        if scale is not None:
            kernel = kernel * scale.view(-1, 1, 1, 1)  # scale: [C_out] as [C_out, 1, 1, 1]
            bias = None if bias is None else bias * scale
        if shift is not None:
            bias = shift if bias is None else bias + shift
        return dataclasses.replace(self, kernel=kernel, bias=bias)

    def reading(self, window: Window) -> "ConvMap":
        """The map applied after its input was padded (positive sides) or cropped (negative) by ``window``."""
        return dataclasses.replace(self, window=self.window + window)

    def pad_output(self, pad: Window) -> Union["ConvMap", Inexact]:
        """The map with its output padded by ``pad`` with its own bias value (DBB's BNAndPadLayer): for a
        pointwise map that is the map reading an input padded with zeros, exactly."""
        if not self.pointwise or self.dilation != (1, 1):
            return Inexact(f"a {self.kernel_size[0]}x{self.kernel_size[1]} map's output padded with its bias is not "
                           "one convolution (only a pointwise map's is)")
        return self.reading(pad)

    def with_groups(self, groups: int) -> Union["ConvMap", Inexact]:
        """The same map written with fewer groups (a depthwise map as a dense one: zeros between groups)."""
        if groups == self.groups:
            return self
        if self.groups % groups:
            return Inexact(f"a map of {self.groups} groups cannot be written with {groups}")
        per_out = self.out_channels // groups  # output channels per new group
        per_in = self.in_channels // groups
        old_in = self.kernel.shape[1]
        kernel = self.kernel.new_zeros(self.out_channels, per_in, *self.kernel_size)
        outs_per_old = self.out_channels // self.groups
        for g in range(self.groups):
            rows = slice(g * outs_per_old, (g + 1) * outs_per_old)
            start = (g * old_in) % per_in  # this old group's first input channel within its new group
            kernel[rows, start:start + old_in] = self.kernel[rows]
        del per_out
        return dataclasses.replace(self, kernel=kernel, groups=groups)

    def with_dilation(self, dilation: Pair) -> Union["ConvMap", Inexact]:
        """The same map at a dilation that divides its own: the kernel spread out with zeros between its taps
        (a 3×3 kernel of dilation 2 is a 5×5 kernel of dilation 1). A side of one tap takes any dilation."""
        steps = []
        for own, new, k in zip(self.dilation, dilation, self.kernel_size):
            if k > 1 and own % new:
                return Inexact(f"a map of dilation {self.dilation} cannot be written with dilation {tuple(dilation)}")
            steps.append(own // new if k > 1 else 1)
        if steps == [1, 1]:
            return dataclasses.replace(self, dilation=tuple(dilation))
        (kh, kw), (sh, sw) = self.kernel_size, steps
        kernel = self.kernel.new_zeros(*self.kernel.shape[:2], (kh - 1) * sh + 1, (kw - 1) * sw + 1)
        kernel[..., ::sh, ::sw] = self.kernel
        return dataclasses.replace(self, kernel=kernel, dilation=tuple(dilation))

    def embedded(self, kernel_size: Pair, offset: Pair) -> "ConvMap":
        """The kernel placed at ``offset`` (row, column) of a zero kernel of ``kernel_size``; the window grows
        so that the map is the same."""
        kh, kw = self.kernel_size
        top, left = offset
        dh, dw = self.dilation
        kernel = F.pad(self.kernel, (left, kernel_size[1] - kw - left, top, kernel_size[0] - kh - top))
        grown = Window(top * dh, (kernel_size[0] - kh - top) * dh, left * dw, (kernel_size[1] - kw - left) * dw)
        return dataclasses.replace(self, kernel=kernel, window=self.window + grown)


def compose(first: ConvMap, second: ConvMap) -> Union[ConvMap, Inexact]:
    """``second`` applied to the output of ``first``, as one map. ``first`` must be pointwise, or ``second``
    a 1×1 map that does not pad (then the result reads ``first``'s window; see :func:`_then_pointwise`).

    The kernels contract over the channels between them (per group); ``first``'s bias goes through
    ``second`` as a constant. Exact only if ``second`` does not pad ``first``'s output with zeros where
    that output is not zero: DBB pads it with the bias instead (BNAndPadLayer, see :meth:`ConvMap.pad_output`).
    """
    if first.out_channels != second.in_channels:
        return Inexact(f"{first.out_channels} channels feed a map that takes {second.in_channels}")
    if not first.pointwise or first.dilation != (1, 1):
        if second.kernel_size == (1, 1) and second.window.is_zero:
            return _then_pointwise(first, second)
        return Inexact(f"composing a {first.kernel_size[0]}x{first.kernel_size[1]} (stride {first.stride}) map with "
                       "another needs the first to be pointwise or the second 1x1 without padding")
    if first.bias is not None and not second.window.positive().is_zero and bool((first.bias != 0).any()):
        return Inexact("the second conv pads the first's output with zeros where the first adds a bias: one conv "
                       "would pad its input instead (DBB pads with the bias, BNAndPadLayer, for this)")
    groups = min(first.groups, second.groups)  # the coarser grouping holds both
    a, b = first.with_groups(groups), second.with_groups(groups)
    if isinstance(a, Inexact) or isinstance(b, Inexact):
        return Inexact(f"a map of {first.groups} groups followed by one of {second.groups} is not one grouped conv")
    outer, inner = b.kernel, a.kernel[:, :, 0, 0]  # [O, M/g, kh, kw], [M, I/g]
    out_per, mid_per = outer.shape[0] // groups, outer.shape[1]
    inner_per = inner.shape[1]
    kernel = outer.new_empty(outer.shape[0], inner_per, *outer.shape[-2:])
    for g in range(groups):
        o, m = slice(g * out_per, (g + 1) * out_per), slice(g * mid_per, (g + 1) * mid_per)
        kernel[o] = torch.einsum("omhw,mi->oihw", outer[o], inner[m])
    bias = b.bias
    if a.bias is not None:  # the constant first.bias through the second kernel: Σ_m,h,w W[o, m, h, w]·b[m]
        through = torch.stack([(outer[g * out_per:(g + 1) * out_per] *
                                a.bias[g * mid_per:(g + 1) * mid_per].view(1, -1, 1, 1)).sum((1, 2, 3))
                               for g in range(groups)]).reshape(-1)
        bias = through if bias is None else bias + through
    return ConvMap(kernel, bias, second.stride, second.dilation, groups, first.window + second.window)


def _then_pointwise(first: ConvMap, second: ConvMap) -> Union[ConvMap, Inexact]:
    """Any map followed by a 1×1 map that does not pad (ExpandNets', SESR's k×k → 1×1): the first map's window,
    read with both strides, each filter a channel mix of the first's filters."""
    groups = min(first.groups, second.groups)
    a, b = first.with_groups(groups), second.with_groups(groups)
    if isinstance(a, Inexact) or isinstance(b, Inexact):
        return Inexact(f"a map of {first.groups} groups followed by one of {second.groups} is not one grouped conv")
    inner, mix = a.kernel, b.kernel[:, :, 0, 0]  # [M, I/g, kh, kw], [O, M/g]
    out_per, mid_per = mix.shape[0] // groups, mix.shape[1]
    kernel = inner.new_empty(mix.shape[0], *inner.shape[1:])
    bias = b.bias
    for g in range(groups):
        o, m = slice(g * out_per, (g + 1) * out_per), slice(g * mid_per, (g + 1) * mid_per)
        kernel[o] = torch.einsum("om,mihw->oihw", mix[o], inner[m])
    if a.bias is not None:  # the first's bias mixed like its filters
        through = torch.cat([mix[g * out_per:(g + 1) * out_per] @ a.bias[g * mid_per:(g + 1) * mid_per]
                             for g in range(groups)])
        bias = through if bias is None else bias + through
    stride = (first.stride[0] * second.stride[0], first.stride[1] * second.stride[1])
    return ConvMap(kernel, bias, stride, first.dilation, groups, first.window)


def _align_axis(starts: Sequence[int], ends: Sequence[int], sizes: Sequence[int], dilation: int
                ) -> Optional[Tuple[List[int], int, Tuple[int, int]]]:
    """Offsets of each kernel in one kernel, its size and its (start, end) padding along one axis; None when
    the maps do not read the same sliding window (their outputs would differ in size, or a kernel tap falls
    between another's)."""
    first = max(starts)
    if any((first - s) % dilation for s in starts):
        return None
    offsets = [(first - s) // dilation for s in starts]
    spans = {s + e - dilation * (k - 1) for s, e, k in zip(starts, ends, sizes)}
    if len(spans) != 1:
        return None
    size = max(o + k for o, k in zip(offsets, sizes))
    return offsets, size, (first, spans.pop() + dilation * (size - 1) - first)


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Where maps over one sliding window sit in one kernel."""

    kernel_size: Pair
    # The window of the one map, relative to the input.
    window: Window
    # (row, column) of each map's kernel in it, in order.
    offsets: Tuple[Pair, ...]
    # The dilation of the one map (a side of 1 takes any dilation: a 1×1 conv or the identity fits any).
    dilation: Pair = (1, 1)


def _common_dilation(maps: Sequence[ConvMap]) -> List[ConvMap]:
    """The maps written with one dilation per axis, the greatest that divides all of theirs (UniRepLKNet's
    dilated small kernels beside a large one become kernels of dilation 1 with zeros between their taps)."""
    common = tuple(math.gcd(*{m.dilation[axis] for m in maps if m.kernel_size[axis] > 1} or {1}) for axis in (0, 1))
    return [m.with_dilation(common) for m in maps]  # never Inexact: the gcd divides every dilation


def _dilation(maps: Sequence[ConvMap], axis: int) -> Optional[int]:
    """The one dilation of ``maps`` along ``axis``, ignoring kernels of one tap there (None: they differ)."""
    used = {m.dilation[axis] for m in maps if m.kernel_size[axis] > 1}
    return used.pop() if len(used) == 1 else None if used else 1


def align(maps: Sequence[ConvMap]) -> Union[Alignment, Inexact]:
    """How ``maps`` line up in one kernel, or why they do not (different stride, dilation, channels, windows)."""
    for attr in ("stride", "in_channels", "out_channels"):
        if len({getattr(m, attr) for m in maps}) != 1:
            return Inexact(f"the maps differ in {attr.replace('_', ' ')}")
    dilation = (_dilation(maps, 0), _dilation(maps, 1))
    if None in dilation:
        return Inexact("the maps differ in dilation")
    rows = _align_axis([m.window.top for m in maps], [m.window.bottom for m in maps],
                       [m.kernel_size[0] for m in maps], dilation[0])
    cols = _align_axis([m.window.left for m in maps], [m.window.right for m in maps],
                       [m.kernel_size[1] for m in maps], dilation[1])
    if rows is None or cols is None:
        return Inexact("the kernels do not fit in one sliding window (paddings, crops and kernel sizes disagree)")
    return Alignment((rows[1], cols[1]), Window(rows[2][0], rows[2][1], cols[2][0], cols[2][1]),
                     tuple(zip(rows[0], cols[0])), dilation)


def add(maps: Sequence[ConvMap]) -> Union[ConvMap, Inexact]:
    """The sum of maps of one input over the same sliding window, as one map (at the greatest dilation that
    divides all of theirs)."""
    if not maps:
        return Inexact("nothing to add")
    maps = _common_dilation(maps)
    aligned = align(maps)
    if isinstance(aligned, Inexact):
        return aligned
    groups = min(m.groups for m in maps)
    kernel = bias = None
    own_kernel = own_bias = False  # whether the running sums are tensors made here (then added into in place)
    for m, offset in zip(maps, aligned.offsets):
        regrouped = m.with_groups(groups)
        if isinstance(regrouped, Inexact):
            return Inexact(f"maps of {sorted({m.groups for m in maps})} groups cannot be added into one conv")
        # one dilation for all (a side of one tap takes any): the embedding grows the window by it
        part = dataclasses.replace(regrouped, dilation=aligned.dilation).embedded(aligned.kernel_size, offset)
        kernel, own_kernel = _accumulated(kernel, part.kernel, own_kernel)
        if part.bias is not None:
            bias, own_bias = _accumulated(bias, part.bias, own_bias)
    return ConvMap(kernel, bias, maps[0].stride, aligned.dilation, groups, aligned.window)


def _accumulated(total: Optional[torch.Tensor], term: torch.Tensor, owned: bool) -> Tuple[torch.Tensor, bool]:
    """(``total + term``, whether the result is a tensor made here). The sum goes into ``total`` itself when that
    was made here (never into a caller's tensor), so that a block's fused kernel costs one kernel of memory
    beyond its branches, not one per branch."""
    if total is None:
        return term, False
    if owned and total.dtype == torch.promote_types(total.dtype, term.dtype) and total.shape == term.shape:
        return total.add_(term), True
    return total + term, True
