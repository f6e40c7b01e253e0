"""Plan an ACB for one conv: which padding is shared, and how each branch crops and pads.

The k×k branch keeps the conv's own window. A 1-row branch placed on row r of a k-row kernel reads the
rows that row r of the k×k window reads, so its window is the k×k window with r·d rows removed on top and
(k − rows − r)·d at the bottom (d the dilation). Where that is negative the input is cropped. Where the
padding cannot be done by the conv itself (non-zero padding modes, TF-style dynamic 'same', asymmetric
padding) it is applied once to the shared input and every branch crops what it does not need.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from .geometry import Placement, Window, asym_offset

__all__ = ["ConvGeometry", "BranchLayout", "BlockLayout", "plan_block"]


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What an ACB needs to know of the conv it replaces."""

    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    # Static padding of the conv; None when it is computed from the input size (timm's Conv2dSame).
    window: Optional[Window]
    padding_mode: str = "zeros"


@dataclasses.dataclass(frozen=True)
class BranchLayout:
    """One branch: its kernel, the crop of the shared input it reads, its own symmetric zero padding."""

    kernel_size: Tuple[int, int]
    # Rows/columns removed from the shared input before this branch's conv.
    crop: Window
    # Symmetric zero padding done by the branch conv itself.
    padding: Tuple[int, int]
    # "rows"/"cols": an even side, output channels split between the two middle rows/columns.
    split: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Shared padding plus the three branches (hor/ver None when that branch is not used)."""

    # Padding applied once to the block input; None when every branch pads natively.
    pre_pad: Optional[Window]
    pre_pad_mode: str
    # True: pre-padding is TF 'same', computed from the input size at run time.
    dynamic_same: bool
    square: BranchLayout
    hor: Optional[BranchLayout]
    ver: Optional[BranchLayout]


def _branch_windows(geom: ConvGeometry, base: Window, placement: Placement, axis: str):
    """Kernel size, window relative to the input, and split axis of the hor ("rows") or ver branch."""
    kh, kw = geom.kernel_size
    dh, dw = geom.dilation
    if axis == "rows":
        first, span = asym_offset(kh, placement)
        shrink = Window(first * dh, (kh - span - first) * dh, 0, 0)
        return (span, kw), base - shrink, "rows" if span == 2 else None
    first, span = asym_offset(kw, placement)
    shrink = Window(0, 0, first * dw, (kw - span - first) * dw)
    return (kh, span), base - shrink, "cols" if span == 2 else None


def _native(kernel_size, window: Window, split) -> Optional[BranchLayout]:
    """Layout that lets the branch conv pad by itself, or None if its padding is asymmetric."""
    pad = window.positive()
    if not pad.is_symmetric:
        return None
    return BranchLayout(kernel_size, window.crop(), (pad.top, pad.left), split)


def plan_block(geom: ConvGeometry, branches: str, placement: Placement) -> BlockLayout:
    """Layout of the ACB replacing a conv of geometry ``geom``.

    ``branches`` is "both", "hor" or "ver"; ``placement`` is "centre" or "border".
    """
    base = geom.window if geom.window is not None else Window()
    wanted = {"both": ("rows", "cols"), "hor": ("rows",), "ver": ("cols",)}[branches]
    parts = [(geom.kernel_size, base, None)]
    parts += [_branch_windows(geom, base, placement, axis) if axis in wanted else None
              for axis in ("rows", "cols")]
    zero_mode = geom.padding_mode == "zeros" or base.is_zero
    if geom.window is not None and zero_mode:
        native = [None if p is None else _native(*p) for p in parts]
        if all(n is not None for n, p in zip(native, parts) if p is not None):
            return BlockLayout(None, "zeros", False, native[0], native[1], native[2])
    # Pad the shared input with the conv's own padding; branches then only crop.
    shared = [None if p is None else BranchLayout(p[0], (base - p[1]), (0, 0), p[2]) for p in parts]
    mode = geom.padding_mode if not base.is_zero else "zeros"
    return BlockLayout(base, mode, geom.window is None, shared[0], shared[1], shared[2])
