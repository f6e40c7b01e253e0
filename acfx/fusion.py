"""The arithmetic of collapsing: BN folding and adding kernels into one window.

All of it runs in float64 and is cast back by the caller, so that collapsing a float32 model adds no
error of its own beyond one rounding. Source: Ding et al., ACNet (ICCV 2019), Sect. 3.3.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Term", "fusion_dtype", "norm_affine", "fold_norm", "embed", "combine", "check_finite",
           "identity_norm_params"]


def fusion_dtype(device: torch.device) -> torch.dtype:
    """The dtype fusion computes in: float64, except on devices without it (Apple MPS: float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclasses.dataclass
class Term:
    """One summed branch as fusion sees it: a conv kernel, its bias, the BN after it, where it sits."""

    # Qualified name of the branch's conv, for error messages.
    name: str
    # The kernel the conv convolves with: [C_out, C_in/groups, h, w].
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    # The BN after the conv (eval semantics), or None; and its name.
    norm: Optional[nn.Module]
    norm_name: str
    # (row, column) of ``weight`` in the fused kernel.
    offset: Tuple[int, int]


def check_finite(name: str, what: str, tensor: Optional[torch.Tensor]) -> None:
    if tensor is not None and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"acfx.collapse: {what} of '{name}' is not finite (NaN or inf). The model cannot be "
                         "fused; check for diverged training or reload a good checkpoint before collapsing.")


def norm_affine(norm: nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BN in eval mode, in float64: γ/σ and β − μ·γ/σ."""
    for what in ("running_mean", "running_var", "weight", "bias"):
        check_finite(name, what, getattr(norm, what, None))
    dtype = fusion_dtype(norm.running_var.device)
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


def combine(terms: Sequence[Term], size: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Σ over ``terms`` of their BN-folded kernels placed at their offsets in a kernel of ``size``, and the
    summed bias (None when no term has a BN or a bias), in :func:`fusion_dtype`. ACNet Sect. 3.3.

    One pass over the weights: each is converted once, scaled per output channel and added into its
    window of the fused kernel (no padded copies). Non-finite weights are found in the result, then named.
    """
    assert terms, "combine needs at least one term"
    first = terms[0].weight
    dtype = fusion_dtype(first.device)
    kernel = torch.zeros(*first.shape[:2], *size, dtype=dtype, device=first.device)
    bias: Optional[torch.Tensor] = None
    for term in terms:
        weight = term.weight.detach()
        b = None if term.bias is None else term.bias.detach().to(dtype)
        h, w = weight.shape[-2:]
        top, left = term.offset
        window = kernel[:, :, top:top + h, left:left + w]
        if term.norm is not None:
            scale, shift = norm_affine(term.norm, term.norm_name)
            window.addcmul_(weight, scale.view(-1, 1, 1, 1).to(dtype))
            b = shift if b is None else shift + scale * b
        else:
            window.add_(weight)
        if b is not None:
            bias = b if bias is None else bias + b
    if not bool(torch.isfinite(kernel).all()):
        for term in terms:  # name the culprit (the slow path runs only on error)
            check_finite(term.name, "weight", term.weight.detach())
        check_finite(terms[0].name, "fused kernel", kernel)
    check_finite(terms[0].name, "fused bias", bias)
    return kernel, bias
