"""A second implementation of the ACB forward: one conv, one BN and one sum, with the same mathematics.

Every branch of an ACB reads the window the k×k kernel's centre row (column) reads, so the 1×k and k×1
kernels, embedded in zero k×k kernels and stacked under the k×k one, give all three branch outputs from one
conv with 3·C_out output channels. BN normalises each channel on its own, so one BN over the stacked
channels, with the three BNs' parameters and statistics side by side, is the three BNs: same batch
statistics in training, same running-statistics updates, same gradients. One reduction then sums the
branches.

The trade: 3× the k×k conv's FLOPs instead of 1.67×, for one conv launch instead of three (GPUs run thin
1×k / k×1 convs at well below their FLOP rate: about half the 3×3's on an H100), one BN instead of three and no
intermediate sums. Which is faster depends on the hardware and the shapes: measure it with
benchmarks/train.py (``exact-stacked``) before choosing. The branch implementation stays the default and
the reference this one is tested against.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convs import kernel_of
from .norms import training_momentum

__all__ = ["stacked_unsupported", "stacked_forward"]



def stacked_unsupported(block: nn.Module) -> Optional[str]:
    """Why ``block`` must run branch by branch (None: the stacked forward computes the same thing)."""
    pairs = block.conv_norm_pairs()
    if pairs is None:
        return "a branch is not one conv and its BN"
    if type(pairs[0][1]) is not nn.Conv2d:
        return f"k×k branch is {type(pairs[0][1]).__name__}, not nn.Conv2d"
    norms = [norm for _, _, norm in pairs]
    if len(norms) < 2 or any(n is None for n in norms):
        return "needs a BN on every branch (norm='branch') and at least one asymmetric branch"
    first = norms[0]
    for norm in norms:
        if type(norm) is not nn.BatchNorm2d:  # SyncBatchNorm must synchronise: left to its own forward
            return f"branch BN is {type(norm).__name__}, not nn.BatchNorm2d"
        if not norm.track_running_stats or not norm.affine:
            return "branch BN without running statistics or affine parameters"
        if (norm.eps, norm.momentum, norm.training) != (first.eps, first.momentum, first.training):
            return "branch BNs differ in eps, momentum or train/eval mode"
    return None


def _by_group(parts: List[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate per-branch tensors [C, ...] so that each conv group holds its channels of every branch.

    A grouped conv assigns output channel o to group o // (C_out_total / groups), hence the order
    (group, branch, channel within the group).
    """
    stacked = torch.stack(parts)  # [branches, C, ...]
    b, c = stacked.shape[:2]
    rest = stacked.shape[2:]
    return stacked.view(b, groups, c // groups, *rest).transpose(0, 1).reshape(b * c, *rest)


def _ungroup(flat: torch.Tensor, branches: int, groups: int) -> torch.Tensor:
    """The inverse of _by_group for a [branches·C] vector: [branches, C]."""
    return flat.view(groups, branches, -1).transpose(0, 1).reshape(branches, -1)


def stacked_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's output from one conv, one BN and one sum (see the module docstring)."""
    if block.pad is not None:
        x = block.pad(x)
    pairs = block.conv_norm_pairs()
    square = pairs[0][1]
    size = tuple(square.kernel_size)
    kernels, biases = [], []
    for (_, conv, _), (top, left) in zip(pairs, block.offsets.values()):
        kernel = kernel_of(conv)
        h, w = kernel.shape[-2:]
        kernel = F.pad(kernel, (left, size[1] - w - left, top, size[0] - h - top))
        kernels.append(kernel)
        biases.append(conv.bias if isinstance(conv.bias, torch.Tensor) else None)
    groups, count = square.groups, len(pairs)
    bias = None
    if any(b is not None for b in biases):
        bias = _by_group([b if b is not None else torch.zeros_like(square.weight[:, 0, 0, 0]) for b in biases],
                         groups)
    # The bias is added after the conv, not passed to it: Inductor (torch 2.11) cannot lower a conv whose
    # bias is a view of a computed tensor.
    y = square._conv_forward(x, _by_group(kernels, groups), None)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    y = _batch_norm(y, [norm for _, _, norm in pairs], groups)
    n, _, h, w = y.shape
    return y.view(n, groups, count, -1, h, w).sum(2).reshape(n, -1, h, w)


def _batch_norm(y: torch.Tensor, norms: List[nn.BatchNorm2d], groups: int) -> torch.Tensor:
    """The BNs of all branches as one BN over the stacked channels; running statistics written back."""
    first = norms[0]
    factors = [training_momentum(norm) for norm in norms] if first.training else [0.0]
    mean = _by_group([n.running_mean for n in norms], groups)
    var = _by_group([n.running_var for n in norms], groups)
    weight = _by_group([n.weight for n in norms], groups)
    bias = _by_group([n.bias for n in norms], groups)
    if len(set(factors)) == 1:
        out = F.batch_norm(y, mean, var, weight, bias, first.training, factors[0], first.eps)
    else:  # momentum=None with branches that have counted different numbers of batches (a pretrained k×k BN)
        out = F.batch_norm(y, mean, var, weight, bias, True, 0.0, first.eps)
        mean, var = _updated_each(y, mean, var, [torch.full_like(n.running_mean, f) for n, f in zip(norms, factors)],
                                  groups)
    if first.training:
        with torch.no_grad():
            for norm, m, v in zip(norms, _ungroup(mean, len(norms), groups), _ungroup(var, len(norms), groups)):
                norm.running_mean.copy_(m)
                norm.running_var.copy_(v)
    return out


def _updated_each(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, factors: List[torch.Tensor],
                  groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stacked running statistics updated with each branch's own momentum factor, as each branch's BN
    would update them (the batch variance unbiased, as nn.BatchNorm2d keeps it)."""
    with torch.no_grad():
        factor = _by_group(factors, groups)
        values = y.detach().to(mean.dtype)
        return ((1 - factor) * mean + factor * values.mean((0, 2, 3)),
                (1 - factor) * var + factor * values.var((0, 2, 3), unbiased=True))
