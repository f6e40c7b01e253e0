"""The arithmetic of collapsing: BN folding and adding kernels into one window.

All of it runs in float64 and is cast back by the caller, so that collapsing a float32 model adds no
error of its own beyond one rounding. Source: Ding et al., ACNet (ICCV 2019), Sect. 3.3.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["norm_affine", "fold_norm", "embed", "check_finite", "identity_norm_params"]


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def check_finite(name: str, what: str, tensor: Optional[torch.Tensor]) -> None:
    if tensor is not None and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"acfx.collapse: {what} of '{name}' is not finite (NaN or inf). The model cannot be "
                         "fused; check for diverged training or reload a good checkpoint before collapsing.")


def norm_affine(norm: nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BN in eval mode, in float64: γ/σ and β − μ·γ/σ."""
    for what in ("running_mean", "running_var", "weight", "bias"):
        check_finite(name, what, getattr(norm, what, None))
    dtype = _compute_dtype(norm.running_var.device)
    var = norm.running_var.to(dtype) + norm.eps
    if bool((var <= 0).any()):
        raise ValueError(f"acfx.collapse: running_var + eps of '{name}' is not positive; the BN statistics are "
                         "broken, recompute them before collapsing.")
    scale = torch.rsqrt(var)  # shape [C_out]
    if norm.weight is not None:
        scale = scale * norm.weight.to(dtype)
    shift = -norm.running_mean.to(dtype) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.to(dtype)
    return scale, shift


def fold_norm(kernel: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
              shift: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """BN(conv(x, kernel) + bias) as one conv: (kernel·scale, shift + scale·bias)."""
    kernel = kernel * scale.view(-1, 1, 1, 1)  # scale: [C_out, 1, 1, 1]
    if bias is not None:
        shift = shift + scale * bias
    return kernel, shift


def embed(kernel: torch.Tensor, size: Tuple[int, int], offset: Tuple[int, int]) -> torch.Tensor:
    """Place ``kernel`` [C_out, C_in/g, h, w] at ``offset`` (row, col) of a zero kernel of ``size``."""
    h, w = kernel.shape[-2:]
    top, left = offset
    return F.pad(kernel, (left, size[1] - w - left, top, size[0] - h - top))


def identity_norm_params(bias: torch.Tensor, eps: float, affine: bool) -> Tuple[dict, float]:
    """BN parameters that compute x + bias in eval mode, and the factor to scale the kernel by.

    ``bias`` must already be in the BN's dtype, so that sqrt(1 + eps) is computed as the BN will.
    Statistics 0/1 and γ = sqrt(1 + eps) make the BN's own scale γ/sqrt(var + eps) exactly 1 in the
    arithmetic of its dtype; a BN without affine parameters carries the shift in its running mean.
    """
    one_plus_eps = torch.ones_like(bias) + eps
    sigma = torch.sqrt(one_plus_eps)
    params = {"running_var": torch.ones_like(bias)}
    if affine:
        params.update(weight=sigma, bias=bias.clone(), running_mean=torch.zeros_like(bias))
        return params, 1.0
    params["running_mean"] = -bias * sigma
    return params, float(sigma[0]) if len(sigma) else 1.0
