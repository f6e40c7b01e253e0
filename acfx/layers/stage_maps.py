"""What each kind of module a branch runs does in the algebra of linear maps (linear_map.py), in eval mode.

A branch is a sequence of modules on the block's input: convs, BatchNorms, per-channel scales, a pad with
the BN's bias (DBB), average pooling, identities. Each becomes one step on the map the branch computes so
far; a module that is not linear in eval, or not one acfx knows, gives the reason instead.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from .convs import PLAIN, conv_kind, is_plain_conv1d, kernel_of
from .geometry import Window, conv_window, same_window
from .linear_map import ConvMap, Inexact, compose
from .norms import foldable_norm, norm_affine
from .split_conv import EvenSplitConv2d

__all__ = ["conv_map", "pool_map", "apply_module", "branch_map", "branch_bias"]


def conv_map(conv: nn.Module, dtype: Optional[torch.dtype] = None, any_mode: bool = False) -> Union[ConvMap, Inexact]:
    """The map a conv acfx knows computes (nn.Conv2d's own computation with zero padding, EvenSplitConv2d, an
    nn.Conv1d as a 2-d conv of height 1).
    ``any_mode``: a conv padding in another mode too, read as if it padded with zeros (the caller checks that
    one conv can pad the same way)."""
    if is_plain_conv1d(conv):
        return _conv1d_map(conv, dtype, any_mode)
    if not isinstance(conv, EvenSplitConv2d) and conv_kind(conv) != PLAIN:
        return Inexact(f"{type(conv).__name__} is not a conv whose computation acfx knows")
    if isinstance(conv, EvenSplitConv2d):
        (ph, pw) = conv.padding
        window: Optional[Window] = Window(ph, ph, pw, pw)
    else:
        window = conv_window(conv)
    if window is None:
        return Inexact(f"padding={conv.padding!r} cannot be resolved")
    if not any_mode and getattr(conv, "padding_mode", "zeros") != "zeros" and not window.positive().is_zero:
        return Inexact(f"{type(conv).__name__} pads with padding_mode={conv.padding_mode!r}, which a sum of maps cannot "
                       "share with the others (pad the block's input once instead)")
    kernel = kernel_of(conv)
    bias = conv.bias
    if dtype is not None:
        kernel, bias = kernel.to(dtype), None if bias is None else bias.to(dtype)
    return ConvMap(kernel, bias, tuple(conv.stride), tuple(conv.dilation), conv.groups, window)


def _conv1d_map(conv: nn.Conv1d, dtype: Optional[torch.dtype], any_mode: bool) -> Union[ConvMap, Inexact]:
    """An nn.Conv1d as a 2-d map of height 1: its length is the width."""
    (k,), (d,) = conv.kernel_size, conv.dilation
    if isinstance(conv.padding, str):
        window = Window() if conv.padding == "valid" else same_window((1, k), (1, d))
    else:
        window = Window(0, 0, conv.padding[0], conv.padding[0])
    if not any_mode and conv.padding_mode != "zeros" and not window.is_zero:
        return Inexact(f"Conv1d pads with padding_mode={conv.padding_mode!r}, which a sum of maps cannot share with "
                       "the others (pad the block's input once instead)")
    kernel, bias = conv.weight.unsqueeze(2), conv.bias
    if dtype is not None:
        kernel, bias = kernel.to(dtype), None if bias is None else bias.to(dtype)
    return ConvMap(kernel, bias, (1, conv.stride[0]), (1, d), conv.groups, window)


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def pool_map(pool: nn.AvgPool2d, channels: int, like: torch.Tensor) -> Union[ConvMap, Inexact]:
    """An nn.AvgPool2d on ``channels`` channels as a depthwise conv, when it is one (the zeros of its padding
    counted, no ceil mode, no divisor of its own)."""
    if not pool.count_include_pad or pool.ceil_mode or pool.divisor_override is not None:
        return Inexact("average pooling with count_include_pad=False, ceil_mode or a divisor_override is not a "
                       "convolution")
    return ConvMap.avg_pool(channels, _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size),
                            _pair(pool.padding), like)


def apply_module(current: Optional[ConvMap], module: nn.Module, name: str, like: torch.Tensor,
                 channels: Optional[int] = None) -> Union[ConvMap, Inexact, None]:
    """The map after ``module`` runs on the output of ``current`` (None: on the branch's input itself, of
    ``channels`` channels).

    ``like``: a tensor of the dtype and device to compute in; ``name``: the module's name, for messages.
    """
    if isinstance(module, nn.Identity):
        return current
    if isinstance(module, nn.AvgPool2d):
        width = current.out_channels if current is not None else channels
        if width is None:
            return Inexact(f"{name}: average pooling of an input whose channels are not known")
        step = pool_map(module, width, like)
        if isinstance(step, Inexact) or current is None:
            return _named(step, name)
        return _named(compose(current, step), name)
    if isinstance(module, (nn.Conv2d, nn.Conv1d, EvenSplitConv2d)):
        step = conv_map(module, like.dtype)
        if isinstance(step, Inexact):
            return Inexact(f"{name}: {step.reason}")
        return step if current is None else _named(compose(current, step), name)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if isinstance(module, nn.BatchNorm3d):
            return Inexact(f"{name}: BatchNorm3d normalises a 3-d tensor; acfx fuses 1-d and 2-d convolutions and "
                           "their BNs only")
        if not foldable_norm(module):
            return Inexact(f"{name}: {type(module).__name__} is not an affine map in eval (drop/act or no statistics)")
        scale, shift = norm_affine(module, name)
        base = current if current is not None else ConvMap.identity(module.num_features, like)
        return base.then_affine(scale.to(like.dtype), shift.to(like.dtype))
    affine = getattr(module, "eval_affine", None)  # acfx's own linear layers (scales, bias-padded norms)
    if callable(affine):
        step = affine(current, like)
        return _named(step, name)
    return Inexact(f"{name}: {type(module).__name__} is not a linear module acfx knows")


def branch_map(modules, names, crop: Window, channels: int, like: torch.Tensor) -> Union[ConvMap, Inexact]:
    """The map of a branch that crops the block's input by ``crop`` and runs ``modules`` on it in order."""
    current: Optional[ConvMap] = None
    for module, name in zip(modules, names):
        current = apply_module(current, module, name, like, channels)
        if isinstance(current, Inexact):
            return current
    if current is None:
        current = ConvMap.identity(channels, like)
    return current.reading(Window() - crop)


def branch_bias(modules, names, channels: int, like: torch.Tensor) -> Union[torch.Tensor, Inexact]:
    """The bias of the map a branch computes: its output away from the border on an input of zeros, found by
    running that constant through each module's own map. Nothing is composed, so an eval forward that needs
    the bias (ACBlock.eval_shift) costs a few small products, not the branch's whole kernel."""
    value = torch.zeros(channels, dtype=like.dtype, device=like.device)
    for module, name in zip(modules, names):
        step = apply_module(None, module, name, like, value.shape[0])
        if isinstance(step, Inexact):
            return step
        if step is not None:  # None: an identity
            value = step.constant_response(value)
    return value


def _named(result: Union[ConvMap, Inexact], name: str) -> Union[ConvMap, Inexact]:
    return Inexact(f"{name}: {result.reason}") if isinstance(result, Inexact) else result
