"""Build the one conv a matched block of summed branches computes in eval mode, from a resolved plan.

The fuser never looks at the graph: the collapse pass resolves a match into a :class:`FusionPlan` (the
branch terms with their offsets, the fused geometry, the padding applied before the branches) the way
torch.ao's fuser receives its matched modules. acfx's own ACBlocks fuse themselves (``ACBlock.fuse``);
this is for blocks written by hand.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch.nn as nn

from ..layers.convs import PLAIN, conv_kind
from ..layers.fusion import Term, combine
from ..layers.geometry import Window, same_window
from ..layers.module_copies import hollow_copy
from ..matching.find_branch_sums import ConvSpec
from ..matching.scope import PreOp

__all__ = ["FusionPlan", "FusedConv", "fuse_plan"]


@dataclasses.dataclass(frozen=True)
class FusionPlan:
    """A fusable block, resolved: what to add up and the geometry of the conv that holds the sum."""

    terms: Tuple[Term, ...]
    kernel_size: Tuple[int, int]
    # The fused conv's window relative to the input of the branches (after ``pre``).
    window: Window
    padding_mode: str
    # The padding the block applies to its input once, before the branches; None when there is none.
    pre: Optional[PreOp]
    # The branch with the largest kernel: its conv is the template when it reads the fused window itself.
    square: ConvSpec
    training: bool


@dataclasses.dataclass(frozen=True)
class FusedConv:
    conv: nn.Module
    # True when the block's largest branch had no bias and the fused conv has one.
    gained_bias: bool


def _padding_for(plan: FusionPlan) -> Tuple[Optional[object], str, str]:
    """(padding argument for nn.Conv2d, padding_mode, reason if none fits)."""
    pre = plan.pre
    if pre is not None and not pre.window.is_zero and plan.padding_mode != "zeros":
        return None, "zeros", "the block pads its input once and its branches pad again in another mode"
    total = plan.window + (pre.window if pre is not None else Window())
    mode = pre.mode if pre is not None and not pre.window.is_zero else plan.padding_mode
    if total.is_symmetric and total.top >= 0 and total.left >= 0:
        return (total.top, total.left), (mode if not total.is_zero else "zeros"), ""
    spec = plan.square
    if tuple(spec.stride) == (1, 1) and total == same_window(plan.kernel_size, spec.dilation):
        return "same", mode, ""
    return None, mode, f"the fused conv would need padding {total}, which nn.Conv2d cannot express"


def _empty_conv(plan: FusionPlan, bias: bool) -> Tuple[Optional[nn.Module], str]:
    """A conv of the fused geometry without tensors yet, or the reason there is none.

    When the fused kernel reads exactly the window of the largest branch, that branch's conv is the
    template (class and configuration, e.g. padding='same', kept); otherwise it is built from the geometry.
    """
    spec, pre = plan.square, plan.pre
    if (pre is None and conv_kind(spec.module) == PLAIN and plan.kernel_size == spec.kernel_size
            and plan.window == spec.window and plan.padding_mode == spec.padding_mode):
        conv = hollow_copy(spec.module)
        conv.register_parameter("bias", None)
        return conv, ""
    args = (spec.in_channels, spec.out_channels, plan.kernel_size, spec.stride)
    if pre is not None and pre.dynamic is not None:
        if not plan.window.is_zero or pre.dynamic != (plan.kernel_size, spec.stride, spec.dilation):
            return None, "the block's TF-'same' padding does not match the fused kernel"
        from timm.layers import Conv2dSame  # only models built with timm's Conv2dSame get here
        return Conv2dSame(*args, 0, spec.dilation, spec.groups, bias, device="meta"), ""
    padding, mode, reason = _padding_for(plan)
    if padding is None:
        return None, reason
    return nn.Conv2d(*args, padding, spec.dilation, spec.groups, bias, padding_mode=mode, device="meta"), ""


def fuse_plan(plan: FusionPlan) -> Tuple[Optional[FusedConv], str]:
    """The conv (with the summed shift as its bias) a hand-written block becomes, or (None, reason)."""
    kernel, bias = combine(plan.terms, plan.kernel_size)
    conv, reason = _empty_conv(plan, bias is not None)
    if conv is None:
        return None, reason
    ref = plan.square.weight()
    conv.register_parameter("weight", nn.Parameter(kernel.to(ref.dtype), ref.requires_grad))
    conv.register_parameter("bias", None if bias is None else nn.Parameter(bias.to(ref.dtype), ref.requires_grad))
    conv.train(plan.training)
    return FusedConv(conv, bias is not None and plan.square.bias is None), ""
