"""Turn a matched, whole-module branch sum into the one conv it computes in eval mode.

If the sum goes straight into a NormTail (the slot of the BN that expand moved into the block), the
fused shift goes back into a BN of the original kind there and the conv keeps the original's structure;
otherwise the conv carries the shift as its bias.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ._modules import hollow_copy
from .block import NormTail
from .branch_match import Branch, BranchSum
from .fusion import check_finite, embed, fold_norm, identity_norm_params, norm_affine
from .geometry import Window, same_window
from .scope import PreOp

__all__ = ["FusedBlock", "fuse_match"]


@dataclasses.dataclass
class FusedBlock:
    """The modules that replace a block (and, if it had one, its BN slot)."""

    conv: nn.Module
    # The restored BN and the qualified name (in the traced part) of the NormTail it replaces.
    tail_target: Optional[str] = None
    norm: Optional[nn.Module] = None
    # True when the block's square branch had no bias and the fused conv has one.
    gained_bias: bool = False


def _square(match: BranchSum) -> Branch:
    """The branch with the largest kernel (the original k×k conv of an ACB)."""
    return max(match.branches, key=lambda b: b.spec.kernel_size[0] * b.spec.kernel_size[1])


def fused_kernel(match: BranchSum, modules: Dict[str, nn.Module], qualify) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Σ over branches of BN-folded kernels, embedded at each branch's offset (float64), and the bias
    (None when no branch has a BN or a bias)."""
    kernel, bias = None, None
    for branch in match.branches:
        name = qualify(branch.conv.target)
        weight = branch.spec.weight().detach()
        check_finite(name, "weight", weight)
        dtype = torch.float32 if weight.device.type == "mps" else torch.float64
        w = weight.to(dtype)
        b = None if branch.spec.bias is None else branch.spec.bias.detach().to(dtype)
        if branch.norm is not None:
            w, b = fold_norm(w, b, *norm_affine(modules[branch.norm.target], qualify(branch.norm.target)))
        w = embed(w, match.kernel_size, branch.offset)
        kernel = w if kernel is None else kernel + w
        if b is not None:
            bias = b if bias is None else bias + b
    return kernel, bias


def _padding_for(pre: Optional[PreOp], match: BranchSum, stride) -> Tuple[Optional[object], str, str]:
    """(padding argument for nn.Conv2d, padding_mode, reason if none fits)."""
    total = match.window + (pre.window if pre is not None else Window())
    mode = pre.mode if pre is not None and not pre.window.is_zero else "zeros"
    if total.is_symmetric and total.top >= 0 and total.left >= 0:
        return (total.top, total.left), (mode if not total.is_zero else "zeros"), ""
    dilation = match.branches[0].spec.dilation
    if tuple(stride) == (1, 1) and total == same_window(match.kernel_size, dilation):
        return "same", mode, ""
    return None, mode, f"the fused conv would need padding {total}, which nn.Conv2d cannot express"


def _empty_conv(pre: Optional[PreOp], match: BranchSum, bias: bool) -> Tuple[Optional[nn.Module], str]:
    """A conv of the fused geometry without weights yet, or the reason there is none.

    When the fused kernel reads exactly the window of the largest branch, that branch's conv is the
    template (class and configuration, e.g. padding='same', kept); otherwise it is built from the geometry.
    """
    square = _square(match).spec
    if (pre is None and type(square.module) is nn.Conv2d and match.kernel_size == square.kernel_size
            and match.window == square.window):
        conv = hollow_copy(square.module)
        conv.register_parameter("bias", None)
        return conv, ""
    spec = match.branches[0].spec
    args = (spec.in_channels, spec.out_channels, match.kernel_size, spec.stride)
    if pre is not None and pre.dynamic is not None:
        if not match.window.is_zero or pre.dynamic != (match.kernel_size, spec.stride, spec.dilation):
            return None, "the block's TF-'same' padding does not match the fused kernel"
        from timm.layers import Conv2dSame  # only models built with timm's Conv2dSame get here
        return Conv2dSame(*args, 0, spec.dilation, spec.groups, bias, device="meta"), ""
    padding, mode, reason = _padding_for(pre, match, spec.stride)
    if padding is None:
        return None, reason
    return nn.Conv2d(*args, padding, spec.dilation, spec.groups, bias, padding_mode=mode, device="meta"), ""


def _tail_of(match: BranchSum, modules: Dict[str, nn.Module], live) -> Optional[fx.Node]:
    users = [u for u in match.output.users if u in live]
    if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], NormTail):
        return users[0]
    return None


def _restore_norm(tail: NormTail, square: Branch, modules, bias: torch.Tensor, kernel: torch.Tensor
                  ) -> Tuple[nn.Module, torch.Tensor]:
    """The BN of the original kind for ``tail``'s slot holding the fused shift; the kernel to use with it."""
    template = tail._norm_template[0]
    source = modules[square.norm.target] if square.norm is not None else None
    ref = source.running_var if source is not None else square.spec.weight()
    params, factor = identity_norm_params(bias.to(ref.dtype).to(ref.device), template.eps, template.affine)
    params["num_batches_tracked"] = (source.num_batches_tracked.clone() if source is not None
                                     else torch.zeros((), dtype=torch.long, device=ref.device))
    requires_grad = source.weight.requires_grad if source is not None and source.affine else True
    return tail.restore(params, tail.training, requires_grad), kernel * factor


def fuse_match(match: BranchSum, pre: Optional[PreOp], modules: Dict[str, nn.Module], live, qualify,
               block_training: bool, restore_tail: bool = True) -> Tuple[Optional[FusedBlock], str]:
    """The fused modules for a whole-module ``match``, or (None, reason)."""
    kernel, bias = fused_kernel(match, modules, qualify)
    square = _square(match)
    tail_node = _tail_of(match, modules, live) if restore_tail else None
    square_weight = square.spec.weight()
    keep_bias = square.spec.bias is not None
    fused = FusedBlock(conv=None)
    if tail_node is not None and bias is not None:
        fused.norm, kernel = _restore_norm(modules[tail_node.target], square, modules, bias, kernel)
        fused.tail_target = tail_node.target
        bias = torch.zeros_like(bias) if keep_bias else None
    conv, reason = _empty_conv(pre, match, bias is not None)
    if conv is None:
        return None, reason
    conv.register_parameter("weight", nn.Parameter(kernel.to(square_weight.dtype), square_weight.requires_grad))
    conv.register_parameter("bias", None if bias is None else nn.Parameter(bias.to(square_weight.dtype),
                                                                           square_weight.requires_grad))
    conv.train(block_training)
    fused.conv = conv
    fused.gained_bias = bias is not None and not keep_bias
    return fused, ""
