"""Padding and cropping of the input an ACB's branches share."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers.padding import pad_same

from .geometry import Window

__all__ = ["DynamicSamePad2d", "make_pad", "crop", "crop_sides", "PAD_MODULES", "PAD_FUNCTIONS"]

# The functions a traced graph calls to pad (F.pad, and the aten binding it dispatches to in some versions).
PAD_FUNCTIONS = (torch.nn.functional.pad,) + ((torch._C._nn.pad,) if hasattr(torch._C._nn, "pad") else ())

# torch.nn padding modules by conv padding_mode; acfx builds these and collapse reads them back.
PAD_MODULES = {
    "zeros": nn.ZeroPad2d,
    "reflect": nn.ReflectionPad2d,
    "replicate": nn.ReplicationPad2d,
    "circular": nn.CircularPad2d,
}


class DynamicSamePad2d(nn.Module):
    """TensorFlow 'SAME' zero padding computed from the input size: timm's own ``pad_same``, which its
    Conv2dSame runs before its conv (the extra pixel of an odd total goes right/bottom)."""

    def __init__(self, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                 dilation: Tuple[int, int]) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, self.kernel_size, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def make_pad(window: Window, mode: str) -> nn.Module:
    """A torch.nn padding module that pads by ``window`` in ``mode`` (a conv padding_mode)."""
    return PAD_MODULES[mode](window.pad_args())


def crop_sides(x: torch.Tensor, sides: Tuple[int, int, int, int]) -> torch.Tensor:
    """Remove (top, bottom, left, right) rows/columns (non-negative amounts) from an NCHW tensor.

    Written as one static slice so that torch.fx records it as a single getitem collapse can read (and so
    that TorchScript compiles it).
    """
    top, bottom, left, right = sides
    if top == 0 and bottom == 0 and left == 0 and right == 0:
        return x
    stop_h: Optional[int] = -bottom if bottom else None
    stop_w: Optional[int] = -right if right else None
    return x[:, :, top:stop_h, left:stop_w]


def crop(x: torch.Tensor, window: Window) -> torch.Tensor:
    """Remove ``window`` rows/columns (non-negative amounts) from the sides of an NCHW tensor."""
    return crop_sides(x, (window.top, window.bottom, window.left, window.right))
