"""Sliding-window geometry: where each ACB branch reads its input.

Branches of an ACB can only be added into one kernel if every output point of every branch reads the same
window of the same input. Everything here is pure integer arithmetic on that window, shared by expand (to
place the branches) and collapse (to check that a set of branches lines up and to size the fused kernel).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch.nn as nn

__all__ = ["Window", "conv_window", "asym_offset", "Placement"]

Placement = str  # "centre" or "border"


@dataclasses.dataclass(frozen=True)
class Window:
    """Padding on each side of a conv input; a negative side is a crop."""

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    def __sub__(self, other: "Window") -> "Window":
        return Window(self.top - other.top, self.bottom - other.bottom,
                      self.left - other.left, self.right - other.right)

    def __add__(self, other: "Window") -> "Window":
        return Window(self.top + other.top, self.bottom + other.bottom,
                      self.left + other.left, self.right + other.right)

    @property
    def is_zero(self) -> bool:
        return self == Window()

    @property
    def is_symmetric(self) -> bool:
        return self.top == self.bottom and self.left == self.right

    def positive(self) -> "Window":
        """The padding part of this window (negative sides set to 0)."""
        return Window(max(self.top, 0), max(self.bottom, 0), max(self.left, 0), max(self.right, 0))

    def crop(self) -> "Window":
        """The crop part of this window, as positive numbers of rows/columns to remove."""
        return (self.positive() - self)

    def pad_args(self) -> Tuple[int, int, int, int]:
        """This window in F.pad / nn.ZeroPad2d order: (left, right, top, bottom)."""
        return (self.left, self.right, self.top, self.bottom)

    @classmethod
    def from_pad_args(cls, pad: Tuple[int, int, int, int]) -> "Window":
        left, right, top, bottom = pad
        return cls(top, bottom, left, right)


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def same_window(kernel_size, dilation) -> Window:
    """PyTorch's padding='same': total d·(k−1) per side pair, the extra pixel right/bottom."""
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return Window(th // 2, th - th // 2, tw // 2, tw - tw // 2)


def conv_window(conv: nn.Conv2d) -> Optional[Window]:
    """The static padding of an nn.Conv2d as a Window; None for string padding we cannot resolve."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return Window()
        if padding == "same":
            return same_window(conv.kernel_size, conv.dilation)
        return None
    ph, pw = _pair(padding)
    return Window(ph, ph, pw, pw)


def asym_offset(size: int, placement: Placement) -> Tuple[int, int]:
    """Where a 1-wide branch sits along a kernel side of ``size``: (first row, rows it spans).

    Odd sides put it on the centre row. Even sides have no centre: the branch spans the two middle rows
    and its output channels are split between them (see EvenSplitConv2d), so no net shift builds up.
    "border" puts it on the last row, as in the paper's Table 4 ablation.
    """
    if placement == "border":
        return size - 1, 1
    if size % 2:
        return (size - 1) // 2, 1
    return size // 2 - 1, 2
