"""Layers of re-parameterisation repositories that fx cannot trace, recognised by what they compute.

DBB's ``BNAndPadLayer`` (DiverseBranchBlock, CVPR 2021) normalises its input and pads the result with the
BN's own shift, assigning into the padded tensor: fx cannot trace the assignment (acfx would read it as an
in-place write). Its computation is simple and linear in eval: the BN, then a pad with the BN's bias. A
module is taken for one only if it has that structure (a ``bn`` child that is a BatchNorm2d and an integer
``pad_pixels``) and, in eval on a random input, computes exactly that (compared in float64); the tracer
then calls it as a leaf and collapse reads it as a BN followed by a pad with its bias.
"""
from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BiasPaddedNorm", "bias_padded_norm"]


@dataclasses.dataclass(frozen=True)
class BiasPaddedNorm:
    """A module that is an eval BN followed by a pad (``pixels`` on each side) with the BN's shift."""

    norm: nn.BatchNorm2d
    pixels: int


def _reference(norm: nn.BatchNorm2d, pixels: int, x: torch.Tensor) -> torch.Tensor:
    y = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    if pixels <= 0:
        return y
    scale = torch.rsqrt(norm.running_var + norm.eps) * (norm.weight if norm.weight is not None else 1.0)
    shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0.0)
    padded = F.pad(y, [pixels] * 4)
    border = torch.ones_like(padded, dtype=torch.bool)
    border[:, :, pixels:-pixels, pixels:-pixels] = False
    return torch.where(border, shift.view(1, -1, 1, 1).expand_as(padded), padded)


def _computes_it(module: nn.Module, norm: nn.BatchNorm2d, pixels: int) -> bool:
    """Whether ``module`` in eval, in float64 on a random input, is the BN and the bias pad (nothing changed).
    Runs the module: not while fx traces (the tracer asks before it starts)."""
    probe = copy.deepcopy(module).double().eval()
    inner = probe.bn
    x = torch.randn(2, norm.num_features, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                    device=norm.running_mean.device)
    with torch.no_grad():
        try:
            got = probe(x)
        except Exception:  # a module of that shape that computes something else
            return False
        want = _reference(inner, pixels, x)
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-12, atol=1e-12))


_SEEN: "weakref.WeakKeyDictionary[nn.Module, Optional[BiasPaddedNorm]]" = weakref.WeakKeyDictionary()


def bias_padded_norm(module: nn.Module) -> Optional[BiasPaddedNorm]:
    """The record of a DBB-style BNAndPadLayer (see the module docstring), or None. Checked once per module."""
    if module in _SEEN:
        return _SEEN[module]
    found = _recognise(module)
    _SEEN[module] = found
    return found


def _recognise(module: nn.Module) -> Optional[BiasPaddedNorm]:
    norm = getattr(module, "_modules", {}).get("bn")
    pixels = getattr(module, "pad_pixels", None)
    if type(norm) is not nn.BatchNorm2d or not isinstance(pixels, int) or isinstance(pixels, bool):
        return None
    if set(module._modules) != {"bn"} or module._parameters or module._buffers:
        return None
    if norm.running_mean is None or norm.running_mean.device.type == "meta" or not _computes_it(module, norm, pixels):
        return None
    return BiasPaddedNorm(norm, pixels)
