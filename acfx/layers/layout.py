"""Plan an ACB for one conv: which padding is shared, and where each branch reads and sits.

The k×k branch keeps the conv's own window. A 1-row branch placed on row r of a k-row kernel reads the
rows that row r of the k×k window reads, so its window is the k×k window with r·d rows removed on top and
(k − rows − r)·d at the bottom (d the dilation). Where that is negative the input is cropped. Where the
padding cannot be done by the conv itself (non-zero padding modes, TF-style dynamic 'same', asymmetric
padding) it is applied once to the shared input and every branch crops what it does not need.

Each branch is one record (:class:`BranchLayout`), computed here once: its kernel, crop, own padding,
even-side split and its offset in the k×k kernel. The block, its fusion and its alternative forwards all
read these records, and :meth:`BlockLayout.record` is what a checkpoint stores of them.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .convs import is_dynamic_same
from .geometry import Placement, Window, asym_offset, conv_window
from .recipe import BRANCH_KINDS

__all__ = ["ConvGeometry", "conv_geometry", "BranchLayout", "BlockLayout", "plan_block", "layout_difference",
           "BRANCHES", "ASYMMETRIC", "REPVGG", "RECORD_FIELDS", "branch_names", "record_fields"]

# ACNet's branches: the k×k conv, then 1×k and k×1. RepVGG's (a recipe's, see recipe.py): a 1×1 conv on the
# kernel's centre, and the identity (the input itself, through a BN) on the same tap.
ACB_BRANCHES = ("square", "hor", "ver")
REPVGG = ("point", "identity")
BRANCHES = ACB_BRANCHES + REPVGG
ASYMMETRIC = ("hor", "ver")
# Branch kinds reading the k×k conv's whole window (another k×k conv, DBB's 1×1 → k×k and 1×1 → average).
_FULL_WINDOW = ("square", "chain", "avg")
# The kind of each branch in a version 3 record (any recipe: repeated k×k branches, DBB's kinds).
KIND_CODES = {kind: code for code, kind in enumerate(BRANCH_KINDS, start=1)}
_SPLITS = {None: 0, "rows": 1, "cols": 2}
_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """What an ACB needs to know of the conv it replaces."""

    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    # Static padding of the conv; None when it is computed from the input size (timm's Conv2dSame).
    window: Optional[Window]
    padding_mode: str = "zeros"


def conv_geometry(conv: nn.Conv2d) -> ConvGeometry:
    """The geometry of a conv acfx knows (see acfx.convs)."""
    window = None if is_dynamic_same(conv) else conv_window(conv)
    return ConvGeometry(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation), window,
                        conv.padding_mode)


@dataclasses.dataclass(frozen=True)
class BranchLayout:
    """One branch: its kernel, the crop of the shared input it reads, its own symmetric zero padding."""

    name: str
    kernel_size: Tuple[int, int]
    # Rows/columns removed from the shared input before this branch's conv.
    crop: Window
    # Symmetric zero padding done by the branch conv itself.
    padding: Tuple[int, int]
    # "rows"/"cols": an even side, output channels split between the two middle rows/columns.
    split: Optional[str] = None
    # (row, column) of this branch's kernel in the k×k kernel (its 2-line kernel, when split).
    offset: Tuple[int, int] = (0, 0)

    @property
    def kind(self) -> str:
        """The branch kind (recipe.py): the name without the number of a repeated k×k branch."""
        return self.name.split("_")[0]

    @property
    def span(self) -> Tuple[int, int]:
        """The size of the kernel the branch convolves with (2 lines when split)."""
        h, w = self.kernel_size
        return (2, w) if self.split == "rows" else (h, 2) if self.split == "cols" else (h, w)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Shared padding plus the branches (square first; hor/ver only when used)."""

    # Padding applied once to the block input; None when every branch pads natively.
    pre_pad: Optional[Window]
    pre_pad_mode: str
    # True: pre-padding is TF 'same', computed from the input size at run time.
    dynamic_same: bool
    branches: Tuple[BranchLayout, ...]

    @property
    def kernel_size(self) -> Tuple[int, int]:
        return self.branches[0].kernel_size

    def branch(self, name: str) -> Optional[BranchLayout]:
        return next((b for b in self.branches if b.name == name), None)

    @property
    def offsets(self) -> Dict[str, Tuple[int, int]]:
        return {b.name: b.offset for b in self.branches}

    @property
    def fused_window(self) -> Window:
        """The window the fused kernel reads of the branches' input (after the shared padding, if any)."""
        if self.pre_pad is not None or self.dynamic_same:
            return Window()
        ph, pw = self.branches[0].padding
        return Window(ph, ph, pw, pw)

    def record(self, normed: Dict[str, bool]) -> List[int]:
        """The integers that decide how the branches' kernels add up (``record_fields`` names them).

        ``normed``: which branches end in a BN of their own. Saved with the weights (ACBlock's ``layout``
        buffer), so that a checkpoint loaded into a block built with other options is refused. Version 1:
        ACNet's branches only (every checkpoint before recipes); 2: RepVGG's branches too; 3: any recipe,
        each branch recorded by its kind, in order.
        """
        pad = self.pre_pad or Window()
        names = [b.name for b in self.branches]
        version = 1 if set(names) <= set(ACB_BRANCHES) else 2 if set(names) <= set(BRANCHES) else 3
        values = [version, *self.kernel_size, int(self.pre_pad is not None), int(self.dynamic_same),
                  *pad.pad_args(), _MODES.get(self.pre_pad_mode, 9)]
        if version == 3:
            values.append(len(self.branches))
            for branch in self.branches:
                values += [KIND_CODES[branch.kind], *self._branch_values(branch, normed)]
            return values
        for name in ACB_BRANCHES if version == 1 else BRANCHES:
            branch = self.branch(name)
            values += [0] * 11 if branch is None else [1, *self._branch_values(branch, normed)]
        return values

    @staticmethod
    def _branch_values(branch: BranchLayout, normed: Dict[str, bool]) -> List[int]:
        return [int(normed.get(branch.name, False)), *branch.offset, *branch.span, _SPLITS[branch.split],
                *branch.crop.pad_args()]


_BRANCH_FIELDS = ("bn", "row", "col", "h", "w", "split", "crop_left", "crop_right", "crop_top", "crop_bottom")
_HEADER = ("version", "kernel_h", "kernel_w", "shared_pad", "dynamic_same", "pad_left", "pad_right", "pad_top",
           "pad_bottom", "pad_mode")


def record_fields(values: List[int]) -> Tuple[str, ...]:
    """The name of each integer of a record (``BlockLayout.record``), read off its version and kinds."""
    if values[:1] != [3]:
        names = ACB_BRANCHES if values[:1] == [1] else BRANCHES
        return _HEADER + tuple(f"{n}.{f}" for n in names for f in ("present",) + _BRANCH_FIELDS)
    fields = list(_HEADER) + ["branch_count"]
    for i in range(len(values[len(fields):]) // (len(_BRANCH_FIELDS) + 1)):
        fields += [f"branch{i}.{f}" for f in ("kind",) + _BRANCH_FIELDS]
    return tuple(fields)


def _recorded_kinds(values: List[int]) -> List[str]:
    """The branch kinds a record holds, in order."""
    if values[:1] != [3]:
        names = ACB_BRANCHES if values[:1] == [1] else BRANCHES
        return [n for i, n in enumerate(names) if values[len(_HEADER) + 11 * i] == 1]
    kinds = {code: kind for kind, code in KIND_CODES.items()}
    return [kinds.get(values[i], "?") for i in range(len(_HEADER) + 1, len(values), len(_BRANCH_FIELDS) + 1)]


# Field names of a version 2 record, for messages about a mismatch.
RECORD_FIELDS = record_fields([2])


def _branch_windows(geom: ConvGeometry, base: Window, placement: Placement, axis: str):
    """Kernel size, window relative to the input, split axis and offset of the hor ("rows") or ver branch."""
    kh, kw = geom.kernel_size
    dh, dw = geom.dilation
    if axis == "rows":
        first, span = asym_offset(kh, placement)
        shrink = Window(first * dh, (kh - span - first) * dh, 0, 0)
        return (1, kw), base - shrink, "rows" if span == 2 else None, (first, 0)
    first, span = asym_offset(kw, placement)
    shrink = Window(0, 0, first * dw, (kw - span - first) * dw)
    return (kh, 1), base - shrink, "cols" if span == 2 else None, (0, first)


def _native(name: str, part) -> Optional[BranchLayout]:
    """Layout that lets the branch conv pad by itself, or None if its padding is asymmetric."""
    kernel_size, window, split, offset = part
    pad = window.positive()
    if not pad.is_symmetric:
        return None
    return BranchLayout(name, kernel_size, window.crop(), (pad.top, pad.left), split, offset)


def _centre_tap(geom: ConvGeometry, base: Window):
    """Kernel size, window, split and offset of a 1×1 branch on the kernel's centre tap (for an even side, the
    tap before the middle: any tap adds up exactly, this one is recorded)."""
    kh, kw = geom.kernel_size
    dh, dw = geom.dilation
    row, col = (kh - 1) // 2, (kw - 1) // 2
    shrink = Window(row * dh, (kh - 1 - row) * dh, col * dw, (kw - 1 - col) * dw)
    return (1, 1), base - shrink, None, (row, col)


def branch_names(kinds: Sequence[str]) -> List[str]:
    """Each branch's name in a block, from the kinds in order: a repeated k×k branch is numbered
    (``square_1``, ...; the conv's own is ``square``), the other kinds are their own names."""
    names, squares = [], 0
    for kind in kinds:
        if kind == "square":
            names.append("square" if squares == 0 else f"square_{squares}")
            squares += 1
        else:
            names.append(kind)
    return names


def plan_block(geom: ConvGeometry, branches: str, placement: Placement, extra: Sequence[str] = ()) -> BlockLayout:
    """Layout of the ACB replacing a conv of geometry ``geom``.

    ``branches`` is "both", "hor" or "ver" (ACNet's asymmetric branches; "none" for none); ``placement`` is
    "centre" or "border"; ``extra``: the kinds of the recipe's other branches, in order (recipe.py): "square"
    (another k×k conv), "point" (a 1×1 conv on the centre tap), "identity" (the input itself, read on the
    centre tap; the caller checks that channels and stride allow it), "chain" and "avg" (DBB's, reading the
    k×k window through a 1×1 conv that pads).
    """
    base = geom.window if geom.window is not None else Window()
    wanted = {"both": ("hor", "ver"), "hor": ("hor",), "ver": ("ver",), "none": ()}[branches]
    parts = {"square": (geom.kernel_size, base, None, (0, 0))}
    for name, axis in (("hor", "rows"), ("ver", "cols")):
        if name in wanted:
            parts[name] = _branch_windows(geom, base, placement, axis)
    for name, kind in zip(branch_names(("square",) + tuple(extra))[1:], extra):
        parts[name] = (geom.kernel_size, base, None, (0, 0)) if kind in _FULL_WINDOW else _centre_tap(geom, base)
    zero_mode = geom.padding_mode == "zeros" or base.is_zero
    if geom.window is not None and zero_mode:
        native = tuple(_native(name, part) for name, part in parts.items())
        # The identity has no conv to pad with: natively it can only crop.
        if all(n is not None for n in native) and all(n.padding == (0, 0) for n in native if n.name == "identity"):
            return BlockLayout(None, "zeros", False, native)
    # Pad the shared input with the conv's own padding; branches then only crop.
    shared = tuple(BranchLayout(name, k, base - window, (0, 0), split, offset)
                   for name, (k, window, split, offset) in parts.items())
    mode = geom.padding_mode if not base.is_zero else "zeros"
    return BlockLayout(base, mode, geom.window is None, shared)


_OPTION_HINTS = (("row", "placement"), ("col", "placement"), ("split", "placement"), ("present", "branches / recipe"),
                 ("bn", "norm (or include_unnormed)"), ("h", "placement"), ("w", "placement"))


def layout_difference(saved: torch.Tensor, own: torch.Tensor) -> Optional[str]:
    """What differs between a checkpoint's recorded block layout and a block's, with the expand option to
    fix (None: they agree)."""
    saved_values, own_values = saved.flatten().tolist(), own.flatten().tolist()
    if saved_values == own_values:
        return None
    if saved_values[:1] not in ([1], [2], [3]):
        return "the checkpoint records a block layout of another acfx version; expand with that version"
    saved_kinds, own_kinds = _recorded_kinds(saved_values), _recorded_kinds(own_values)
    if saved_kinds != own_kinds:
        return (f"the checkpoint's block has the branches {saved_kinds}, this one {own_kinds}: expand with the "
                "recipe (and branches, kxk_branches) the checkpoint was trained with")
    if len(saved_values) != len(own_values) or saved_values[:1] != own_values[:1]:
        return "the checkpoint records a block layout of another acfx version; expand with that version"
    names = record_fields(own_values)
    fields = [f for f, a, b in zip(names, saved_values, own_values) if a != b]
    options = sorted({hint for f in fields for key, hint in _OPTION_HINTS if f.endswith("." + key)})
    fix = (f"expand with the {' / '.join(options)} the checkpoint was trained with" if options else
           "the model's convs differ from those of training (padding, kernel size)")
    details = ", ".join(f"{f} {a} (checkpoint) vs {b} (model)" for f, a, b in zip(names, saved_values, own_values)
                        if a != b)
    return f"the checkpoint's branches add up differently from this block's ({details}): {fix}"
