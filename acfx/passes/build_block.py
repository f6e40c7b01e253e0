"""Build the ACB (and the module for the BN's slot) that replaces one conv→BN site.

Nothing here writes to the user's modules: the k×k branch shares the conv's and the BN's tensors, every
other tensor is new. Swapping the modules into the model is swap_modules.py's job.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers.block import ACBlock, NormTail
from ..layers.convs import PLAIN, conv_kind
from ..layers.layout import BlockLayout, BranchLayout, ConvGeometry, conv_geometry, plan_block
from ..layers.module_copies import hollow_copy
from ..layers.norms import branch_norm, plain_norm, tail_children
from ..layers.online import OnlineACConv
from ..layers.padding import DynamicSamePad2d, make_pad
from ..layers.recipe import Recipe
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


def _unnormed_bn(conv: nn.Conv2d) -> nn.Module:
    """BN for an asymmetric branch of a conv that no BN follows: nn.BatchNorm2d defaults."""
    bn = nn.BatchNorm2d(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype)
    bn.requires_grad_(conv.weight.requires_grad)
    bn.train(conv.training)
    return bn


def _online(conv: nn.Conv2d, opts: ExpandOptions) -> BuiltSite:
    """Online mode: one conv with merged kernels; the BN (if any) stays in its slot."""
    recipe = opts.resolved_recipe()
    extra = applicable_kinds(conv, recipe)
    layout = plan_block(conv_geometry(conv), _asymmetric(recipe, opts), opts.placement, extra)
    gamma = opts.branch_gamma(len(layout.branches))
    scale = 1.0 if gamma is None else gamma
    asym = 0.0 if opts.init == "preserve" else scale
    block = OnlineACConv(conv, _asymmetric(recipe, opts), opts.placement, scale=scale, asym_scale=asym,
                         extra=extra)
    return BuiltSite(block, None)


def _asymmetric(recipe: Recipe, opts: ExpandOptions) -> str:
    """ACNet's branches of the recipe that ``branches=`` keeps, as plan_block's choice."""
    chosen = {"both": {"hor", "ver"}, "hor": {"hor"}, "ver": {"ver"}}[opts.branches]
    kept = chosen & set(recipe.branches)
    return "both" if kept == {"hor", "ver"} else kept.pop() if kept else "none"


def applicable_kinds(conv: nn.Conv2d, recipe: Recipe) -> Tuple[str, ...]:
    """The recipe's branch kinds (beside ACNet's, which plan_block places) that apply to ``conv``: the identity
    where the conv maps each channel onto itself position by position (as many channels out as in, stride 1),
    average pooling where the conv has no dilation (nn.AvgPool2d has none); every other kind everywhere."""
    identity = conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
    undilated = tuple(conv.dilation) == (1, 1)
    return tuple(kind for kind in recipe.branches if kind not in ("hor", "ver")
                 and (kind != "identity" or identity) and (kind != "avg" or undilated))


def _new_conv(conv: nn.Conv2d, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
              init: str) -> nn.Conv2d:
    """A new conv of a branch on the device and dtype of ``conv``, following its train mode and requires_grad;
    ``init``: "default" (nn.Conv2d's), "zero", or "identity" (each channel onto itself: a 1×1 conv as many
    channels out as in)."""
    new = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, conv.groups, bias=False,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    if init != "default":
        with torch.no_grad():
            new.weight.zero_()
            if init == "identity":
                per_group = in_channels // conv.groups
                new.weight[torch.arange(out_channels), torch.arange(out_channels) % per_group, 0, 0] = 1
    new.weight.requires_grad_(conv.weight.requires_grad)
    new.train(conv.training)
    return new


def _stages(kind: str, branch: BranchLayout, conv: nn.Conv2d, norm_for: Callable[[Optional[int]], Optional[nn.Module]],
            zero: bool) -> List[Tuple[str, nn.Module]]:
    """The named modules of one new branch of ``kind``; ``norm_for(features)`` gives a branch's BN (None with
    norm="sum"): its last BN with ``features=None``, a BN inside it otherwise. ``zero``: the branch starts at 0
    (init="preserve" without branch BNs)."""
    name = branch.name
    init = "zero" if zero else "default"
    if kind == "identity":  # the input itself (and its BN)
        stages = []
    elif kind in ("chain", "avg"):
        # DBB: a 1×1 conv that pads (zeros through the 1×1 conv, then its BN: what BNAndPadLayer pads with),
        # then the k×k conv (of 1×1's channels: as many as the input, twice as many for a depthwise conv) or
        # the k×k average, reading the padded map without padding of its own.
        mid = conv.in_channels if conv.groups < conv.out_channels else 2 * conv.in_channels
        mid = mid if kind == "chain" else conv.out_channels
        first = "identity" if kind == "chain" and mid == conv.in_channels else "default"
        pre = _new_conv(conv, conv.in_channels, mid, 1, 1, branch.padding, 1, "zero" if zero and kind == "avg" else first)
        stages = [(name + "_pre", pre)]
        if norm_for(mid) is not None:
            stages.append((name + "_pre_bn", norm_for(mid)))
        if kind == "chain":
            stages.append((name, _new_conv(conv, mid, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                           conv.dilation, init)))
        else:
            stages.append((name, nn.AvgPool2d(conv.kernel_size, conv.stride, 0)))
    elif branch.split is not None:
        new = EvenSplitConv2d(conv.in_channels, conv.out_channels, branch.kernel_size, branch.split, conv.stride,
                              conv.dilation, conv.groups, branch.padding, device=conv.weight.device,
                              dtype=conv.weight.dtype)
        if zero:
            with torch.no_grad():
                new.weight.zero_()
        new.weight.requires_grad_(conv.weight.requires_grad)
        new.train(conv.training)
        stages = [(name, new)]
    else:  # another k×k conv, a 1×k / k×1 / 1×1 conv
        stages = [(name, _new_conv(conv, conv.in_channels, conv.out_channels, branch.kernel_size, conv.stride,
                                   branch.padding, conv.dilation, init))]
    last = norm_for(None)
    return stages + ([(name + "_bn", last)] if last is not None else [])


def build_site(conv: nn.Conv2d, norm: Optional[nn.Module], opts: ExpandOptions) -> BuiltSite:
    """The ACB for ``conv`` (and the BN ``norm`` after it, if any) under ``opts``."""
    if opts.mode == "online":
        return _online(conv, opts)
    geom = conv_geometry(conv)
    recipe = opts.resolved_recipe()
    layout = plan_block(geom, _asymmetric(recipe, opts), opts.placement, applicable_kinds(conv, recipe))
    square = layout.branch("square")
    assert square is not None and square.crop.is_zero, layout
    preserve = opts.init == "preserve"
    per_branch = opts.norm == "branch"
    gamma_init = opts.branch_gamma(len(layout.branches))
    source = norm if norm is not None else _unnormed_bn(conv)

    def norm_for(features: Optional[int]) -> Optional[nn.Module]:
        if not per_branch:
            return None
        if features is not None:  # a BN inside the branch: nn.BatchNorm2d's start
            return branch_norm(source, None, None, features)
        return branch_norm(source, 0.0 if preserve else gamma_init, 0.0 if preserve else None)

    stages: Dict[str, List[Tuple[str, nn.Module]]] = {"square": [("square", _square(conv, layout))]}
    if per_branch and norm is not None:
        stages["square"].append(("square_bn", plain_norm(norm, gamma_init)))
    for branch in layout.branches[1:]:
        stages[branch.name] = _stages(branch.kind, branch, conv, norm_for, zero=preserve and not per_branch)
    block = ACBlock(layout, stages, pad=_pre_pad(layout, geom), template=hollow_copy(conv))
    block.training = conv.training
    tail = None
    if per_branch and norm is not None:
        tail = NormTail(norm, tail_children(norm), block)
        tail.training = norm.training
    return BuiltSite(block, tail)
