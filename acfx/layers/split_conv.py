"""The asymmetric branch of an even-sized kernel, split between the two middle rows (or columns).

A 2×2 or 4×4 kernel has no centre row. Putting every 1×k filter on one of the two middle rows would
shift all features half a pixel the same way, and the shift adds up with depth (Wu et al., ICML 2019).
Here even output channels sit on the upper (left) middle row and odd channels on the lower (right) one,
so the shifts cancel on average. The module owns a 1×k (k×1) weight and convolves with the 2×k (k×2)
kernel it spans, zero on the row each channel does not use; collapse adds that kernel as it is.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EvenSplitConv2d", "split_between_lines", "even_channel_mask"]


def even_channel_mask(out_channels: int, like: torch.Tensor) -> torch.Tensor:
    """[C_out, 1, 1, 1]: 1 for even output channels, 0 for odd ones."""
    return (torch.arange(out_channels, device=like.device) % 2 == 0).view(-1, 1, 1, 1).to(like.dtype)


def split_between_lines(weight: torch.Tensor, axis: str, even: torch.Tensor) -> torch.Tensor:
    """The 2-line kernel of a 1×k ("rows") or k×1 ("cols") ``weight``: even channels (``even`` = 1) on the
    first line, odd channels on the second."""
    dim = 2 if axis == "rows" else 3
    return torch.cat([weight * even, weight * (1 - even)], dim=dim)


class EvenSplitConv2d(nn.Module):
    """1×k ("rows") or k×1 ("cols") conv whose output channels alternate between two middle lines."""

    padding_mode = "zeros"
    bias = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int], axis: str,
                 stride: Tuple[int, int], dilation: Tuple[int, int], groups: int,
                 padding: Tuple[int, int] = (0, 0), device=None, dtype=None) -> None:
        super().__init__()
        if axis not in ("rows", "cols"):
            raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.axis = axis
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), groups
        self.padding = tuple(padding)
        self.weight = nn.Parameter(torch.empty(
            out_channels, in_channels // groups, *self.kernel_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same as nn.Conv2d's default init.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def effective_weight(self) -> torch.Tensor:
        """The 2-line kernel this branch convolves with: [out, in/groups, 2, k] or [out, in/groups, k, 2]."""
        # The channel mask is derived, not stored: nothing that defines the kernel lives outside the state_dict
        # (to_empty or a meta-device build would leave a stored mask uninitialised, and no checkpoint restores it).
        return split_between_lines(self.weight, self.axis, even_channel_mask(self.out_channels, self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), None, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"axis={self.axis!r}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}")
