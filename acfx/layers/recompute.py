"""A third implementation of the ACB forward: the branch forward, keeping less for backward.

Autograd's conv→BN keeps the conv's output (the BN's input) for backward, so each ACB branch holds one
C_out×H×W tensor: three per block where the original conv→BN held one, which is most of the ACB's extra
training memory (a three-branch ACB resnet34 peaked at 1.62× the base model's memory on an H100). Here
each branch's conv→BN is one autograd Function that keeps only what it was given (the block's input, shared by the three branches
and usually kept by the previous layer anyway, and the weights) and the per-channel batch statistics, and
recomputes the conv output in backward, normalising it with those statistics. The mathematics are
those of the branch forward: batch statistics in training, running statistics updated once per forward,
and the same gradients (the same BN and conv backward kernels), for the price of one more conv forward per
branch in backward. Recomputation runs under the autocast state of the forward.

Only training-mode blocks whose branches all have a plain nn.BatchNorm2d use it; the others keep the branch
forward (:func:`recompute_unsupported` says why).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convs import kernel_of
from .geometry import conv_window
from .norms import training_momentum
from .padding import crop_sides
from .split_conv import EvenSplitConv2d

__all__ = ["recompute_unsupported", "recompute_forward"]



def _autocast_devices() -> frozenset:
    """Device types that have autocast, found once: asked inside a compiled region, torch 2.11 breaks the graph."""
    found = set()
    for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia"):
        try:
            if torch.amp.is_autocast_available(device_type):
                found.add(device_type)
        except (AttributeError, RuntimeError):  # older torch, or a device type this build does not know
            pass
    return frozenset(found)


_AUTOCAST_DEVICES = _autocast_devices()


def _autocast_state(device_type: str) -> tuple:
    """(enabled, dtype) of autocast on this device type; (False, None) where autocast does not exist (meta)."""
    if device_type not in _AUTOCAST_DEVICES:
        return False, None
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_as(device_type: str, enabled: bool, dtype) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=dtype, enabled=enabled) if dtype is not None else contextlib.nullcontext()


class _ConvBatchNorm(torch.autograd.Function):
    """conv → training-mode BN that keeps its inputs and the batch statistics, not the conv output.

    Backward recomputes the conv output (under the forward's autocast state) and runs the BN and conv
    backward kernels on it, with the statistics of the forward: the same kernels autograd runs for the
    branch forward, plus one conv forward.
    """

    @staticmethod
    def forward(ctx, x, weight, conv_bias, bn_weight, bn_bias, conv_args, bn_args):
        # bn_args: (running_mean, running_var, momentum factor, eps); running statistics updated here, once.
        running_mean, running_var, factor, eps = bn_args
        with torch.no_grad():
            y = F.conv2d(x, weight, conv_bias, *conv_args)
            out, mean, invstd = torch.ops.aten.native_batch_norm(y, bn_weight, bn_bias, running_mean, running_var,
                                                                 True, factor, eps)
        ctx.save_for_backward(x, weight, conv_bias, bn_weight, mean, invstd)
        ctx.conv_args, ctx.eps = conv_args, eps
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, conv_bias, bn_weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        with torch.no_grad(), _autocast_as(*ctx.autocast):
            y = F.conv2d(x, weight, conv_bias, *ctx.conv_args)
        grad_y, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_out.to(y.dtype), y, bn_weight, None, None, mean, invstd, True, ctx.eps,
            [need_x or need_w or need_b, need_gamma, need_beta])
        grad_x = grad_w = grad_b = None
        if need_x or need_w or need_b:
            stride, padding, dilation, groups = ctx.conv_args
            bias_sizes = [weight.shape[0]] if conv_bias is not None else None
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y, x.to(y.dtype), weight.to(y.dtype), bias_sizes, list(stride), list(padding), list(dilation),
                False, [0, 0], groups, [need_x, need_w, need_b and conv_bias is not None])
        grads = (_like(grad_x, x), _like(grad_w, weight), _like(grad_b, conv_bias), _like(grad_gamma, bn_weight),
                 _like(grad_beta, bn_weight))
        return (*grads, None, None)


def _like(grad: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``grad`` in the dtype of the tensor it is the gradient of (autocast ran the kernels in another)."""
    return None if grad is None or ref is None else grad.to(ref.dtype)


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
    pairs = block.conv_norm_pairs()
    if pairs is None:
        return "a branch is not one conv and its BN"
    for _, conv, norm in pairs:
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


def _numeric_padding(conv: nn.Module, x: torch.Tensor) -> tuple:
    """(input, padding as two ints) computing what ``conv``'s padding does: an asymmetric 'same' (even
    kernels) pads the input first, the way F.conv2d does."""
    if not isinstance(conv.padding, str):
        return x, tuple(conv.padding)
    window = conv_window(conv)
    if window.is_symmetric:
        return x, (window.top, window.left)
    return F.pad(x, window.pad_args()), (0, 0)


def _branch(conv: nn.Module, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    weight = kernel_of(conv)
    x, padding = _numeric_padding(conv, x)
    conv_args = (tuple(conv.stride), padding, tuple(conv.dilation), conv.groups)
    bn_args = (norm.running_mean, norm.running_var, training_momentum(norm), norm.eps)
    return _ConvBatchNorm.apply(x, weight, conv.bias, norm.weight, norm.bias, conv_args, bn_args)


def recompute_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's training output, each branch's conv→BN recomputed in backward (see the module docstring)."""
    if block.pad is not None:
        x = block.pad(x)
    out = None
    for sides, conv, norm in block.conv_norm_pairs():
        y = _branch(conv, norm, crop_sides(x, sides))
        out = y if out is None else out + y
    return out
