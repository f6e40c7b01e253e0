"""A third implementation of the ACB forward: the branch forward, keeping less for backward.

Autograd's conv→BN keeps the conv's output (the BN's input) for backward, so each ACB branch holds one
C_out×H×W tensor: three per block where the original conv→BN held one, which is most of the ACB's extra
training memory (shared/GPU-BENCH.md: 1.62× base peak memory on resnet34). Here each branch's conv→BN is
one autograd Function that keeps only what it was given (the block's input, shared by the three branches
and usually kept by the previous layer anyway, and the weights) and recomputes the conv and the batch
statistics in backward. The mathematics are those of the branch forward: batch statistics in training,
running statistics updated once per forward, and the same gradients, for the price of one more conv and BN
forward per branch in backward. Recomputation runs under the autocast state of the forward.

Only training-mode blocks whose branches all have a plain nn.BatchNorm2d use it; the others keep the branch
forward (:func:`recompute_unsupported` says why).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .padding import crop
from .split_conv import EvenSplitConv2d

__all__ = ["recompute_unsupported", "recompute_forward"]

_NAMES = ("square", "hor", "ver")


def _autocast_state(device_type: str) -> tuple:
    """(enabled, dtype) of autocast on this device type; (False, None) where autocast does not exist (meta)."""
    if not torch.amp.is_autocast_available(device_type):
        return False, None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_as(device_type: str, enabled: bool, dtype) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=dtype, enabled=enabled) if dtype is not None else contextlib.nullcontext()


class _ConvBatchNorm(torch.autograd.Function):
    """conv → training-mode BN that keeps its inputs, not the conv output, and recomputes in backward."""

    @staticmethod
    def forward(ctx, x, weight, conv_bias, bn_weight, bn_bias, conv_args, bn_args):
        # bn_args: (running_mean, running_var, momentum factor, eps); running statistics updated here, once.
        running_mean, running_var, factor, eps = bn_args
        with torch.no_grad():
            y = F.conv2d(x, weight, conv_bias, *conv_args)
            out = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, True, factor, eps)
        ctx.save_for_backward(x, weight, conv_bias, bn_weight, bn_bias)
        ctx.conv_args, ctx.eps = conv_args, eps
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(saved, ctx.needs_input_grad)]
        with torch.enable_grad(), _autocast_as(device_type, enabled, dtype):
            x, weight, conv_bias, bn_weight, bn_bias = inputs
            y = F.conv2d(x, weight, conv_bias, *ctx.conv_args)
            out = F.batch_norm(y, None, None, bn_weight, bn_bias, True, 0.0, ctx.eps)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        return (*(next(grads) if t is not None and t.requires_grad else None for t in inputs), None, None)


def _conv_reason(conv: nn.Module) -> Optional[str]:
    if type(conv) not in (nn.Conv2d, EvenSplitConv2d):  # a subclass may compute something else
        return f"branch conv is {type(conv).__name__}, not nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"branch conv pads by itself with padding_mode={conv.padding_mode!r}"
    return None


def recompute_unsupported(block: nn.Module) -> Optional[str]:
    """Why ``block`` must run the plain branch forward (None: the recompute forward computes the same thing)."""
    if not hasattr(torch.amp, "is_autocast_available"):
        return "needs torch >= 2.4 (per-device autocast state, to recompute under the forward's autocast)"
    for name in _NAMES:
        conv, norm = getattr(block, name), getattr(block, name + "_bn")
        if conv is None:
            continue
        if norm is None:
            return "needs a BN on every branch (norm='branch')"
        if type(norm) is not nn.BatchNorm2d:  # SyncBatchNorm must synchronise: left to its own forward
            return f"branch BN is {type(norm).__name__}, not nn.BatchNorm2d"
        if not (norm.training and norm.track_running_stats and norm.affine):
            return "branch BN in eval mode, or without running statistics or affine parameters"
        reason = _conv_reason(conv)
        if reason:
            return reason
    return None


def _momentum(norm: nn.BatchNorm2d) -> float:
    """What nn.BatchNorm2d.forward passes to F.batch_norm in training, with its num_batches_tracked step."""
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
    return (1.0 / float(norm.num_batches_tracked)) if norm.momentum is None else norm.momentum


def _branch(conv: nn.Module, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    weight = conv.effective_weight() if isinstance(conv, EvenSplitConv2d) else conv.weight
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    conv_args = (tuple(conv.stride), padding, tuple(conv.dilation), conv.groups)
    bn_args = (norm.running_mean, norm.running_var, _momentum(norm), norm.eps)
    return _ConvBatchNorm.apply(x, weight, conv.bias, norm.weight, norm.bias, conv_args, bn_args)


def recompute_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's training output, each branch's conv→BN recomputed in backward (see the module docstring)."""
    if block.pad is not None:
        x = block.pad(x)
    out = _branch(block.square, block.square_bn, x)
    for name, window in (("hor", block.hor_crop), ("ver", block.ver_crop)):
        conv = getattr(block, name)
        if conv is not None:
            out = out + _branch(conv, getattr(block, name + "_bn"), crop(x, window))
    return out
