"""Build the ACB (and the module for the BN's slot) that replaces one conv→BN site.

Nothing here writes to the user's modules: the k×k branch shares the conv's and the BN's tensors, every
other tensor is new. Swapping the modules into the model is swap_modules.py's job.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..layers.convs import PLAIN, conv_kind
from ..layers.layout import BlockLayout, BranchLayout, ConvGeometry, conv_geometry, plan_block
from ..layers.module_copies import hollow_copy
from ..layers.norms import branch_norm, plain_norm, tail_children
from ..layers.online import OnlineACConv
from ..layers.padding import DynamicSamePad2d, make_pad
from ..layers.split_conv import EvenSplitConv2d
from .options import ExpandOptions

__all__ = ["BuiltSite", "build_site"]


@dataclasses.dataclass
class BuiltSite:
    """The modules to swap in for one site."""

    block: nn.Module  # ACBlock, or OnlineACConv in online mode
    # What goes into the BN's slot; None when the BN stays where it is (norm="sum") or there is none.
    tail: Optional[nn.Module]


def _pre_pad(layout: BlockLayout, geom: ConvGeometry) -> Optional[nn.Module]:
    if layout.dynamic_same:
        return DynamicSamePad2d(geom.kernel_size, geom.stride, geom.dilation)
    if layout.pre_pad is None or layout.pre_pad.is_zero:
        return None
    return make_pad(layout.pre_pad, layout.pre_pad_mode)


def _square(conv: nn.Conv2d, layout: BlockLayout) -> nn.Conv2d:
    """The k×k branch: the conv's own weight and bias (shared, not copied).

    Where the conv pads by itself it keeps its whole configuration and class (padding='same' included);
    behind a shared padding it becomes an nn.Conv2d with padding 0.
    """
    if layout.pre_pad is None and conv_kind(conv) == PLAIN:
        new = hollow_copy(conv)
    else:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                        conv.dilation, conv.groups, bias=conv.bias is not None, device="meta")
    new.register_parameter("weight", conv.weight)
    new.register_parameter("bias", conv.bias)
    new.training = conv.training
    return new


def _asym(conv: nn.Conv2d, branch: BranchLayout, zero: bool) -> nn.Module:
    """A new 1×k or k×1 conv, initialised as nn.Conv2d initialises (or zero)."""
    kwargs = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    if branch.split is not None:
        new = EvenSplitConv2d(conv.in_channels, conv.out_channels, branch.kernel_size, branch.split, conv.stride,
                              conv.dilation, conv.groups, branch.padding, **kwargs)
    else:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, branch.kernel_size, conv.stride, branch.padding,
                        conv.dilation, conv.groups, bias=False, **kwargs)
    if zero:
        with torch.no_grad():
            new.weight.zero_()
    new.weight.requires_grad_(conv.weight.requires_grad)
    new.train(conv.training)
    return new


def _unnormed_bn(conv: nn.Conv2d) -> nn.Module:
    """BN for an asymmetric branch of a conv that no BN follows: nn.BatchNorm2d defaults."""
    bn = nn.BatchNorm2d(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
    bn.requires_grad_(conv.weight.requires_grad)
    bn.train(conv.training)
    return bn


def _online(conv: nn.Conv2d, opts: ExpandOptions) -> BuiltSite:
    """Online mode: one conv with merged kernels; the BN (if any) stays in its slot."""
    scale = 1.0 if opts.gamma_init is None else opts.gamma_init
    asym = 0.0 if opts.init == "preserve" else scale
    block = OnlineACConv(conv, opts.branches, opts.placement, scale=scale, asym_scale=asym)
    return BuiltSite(block, None)


def _repvgg_branches(conv: nn.Conv2d, opts: ExpandOptions) -> tuple:
    """RepVGG's branches for ``conv`` under ``opts.recipe``: the 1×1 conv, and the identity where the conv
    maps each channel onto itself position by position (as many channels out as in, stride 1)."""
    if opts.recipe not in ("repvgg", "acb+repvgg"):
        return ()
    identity = conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
    return ("point", "identity") if identity else ("point",)


def build_site(conv: nn.Conv2d, norm: Optional[nn.Module], opts: ExpandOptions) -> BuiltSite:
    """The ACB for ``conv`` (and the BN ``norm`` after it, if any) under ``opts``."""
    if opts.mode == "online":
        return _online(conv, opts)
    geom = conv_geometry(conv)
    acb = opts.recipe in ("acb", "acb+repvgg")
    layout = plan_block(geom, opts.branches if acb else "none", opts.placement, _repvgg_branches(conv, opts))
    square = layout.branch("square")
    assert square is not None and square.crop.is_zero, layout
    preserve = opts.init == "preserve"
    per_branch = opts.norm == "branch"
    convs: Dict[str, nn.Module] = {"square": _square(conv, layout)}
    norms: Dict[str, Optional[nn.Module]] = {
        "square": plain_norm(norm, opts.gamma_init) if (per_branch and norm is not None) else None}
    for branch in layout.branches[1:]:
        if branch.name != "identity":  # the identity branch is the input itself (and its BN)
            convs[branch.name] = _asym(conv, branch, zero=preserve and not per_branch)
        if per_branch:
            source = norm if norm is not None else _unnormed_bn(conv)
            gamma = 0.0 if preserve else opts.gamma_init
            norms[branch.name] = branch_norm(source, gamma, 0.0 if preserve else None)
    block = ACBlock(layout, convs, norms, pad=_pre_pad(layout, geom), template=hollow_copy(conv))
    block.training = conv.training
    tail = None
    if per_branch and norm is not None:
        tail = NormTail(norm, tail_children(norm), block)
        tail.training = norm.training
    return BuiltSite(block, tail)
