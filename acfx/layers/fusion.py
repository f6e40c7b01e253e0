"""How a block is fused: BN folding, adding kernels into one window, and an ACB with its NormTail.

All of it runs in float64 and is cast back by the caller, so that collapsing a float32 model adds no
error of its own beyond one rounding. Source: Ding et al., ACNet (ICCV 2019), Sect. 3.3.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .module_copies import refill_conv

__all__ = ["Term", "fusion_dtype", "norm_affine", "fold_norm", "embed", "combine", "check_finite",
           "identity_norm_params", "fuse_pair"]


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


def _tail_norm(block: nn.Module, tail: nn.Module, bias: torch.Tensor, kernel: torch.Tensor
               ) -> Tuple[nn.Module, torch.Tensor]:
    """The BN for ``tail``'s slot holding the fused shift ``bias``; the kernel to use with it."""
    template = tail._norm_template[0]
    source = block.square_bn
    ref = source.running_var if source is not None else block.square.weight
    params, factor = identity_norm_params(bias.to(ref.dtype).to(ref.device), template.eps, template.affine)
    params["num_batches_tracked"] = (source.num_batches_tracked.clone() if source is not None
                                     else torch.zeros((), dtype=torch.long, device=ref.device))
    requires_grad = source.weight.requires_grad if source is not None and source.affine else True
    return tail.restore(params, tail.training, requires_grad), (kernel if factor == 1.0 else kernel * factor)


def fuse_pair(block: Optional[nn.Module], restore_tail: bool = True, name: str = ""
              ) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """(conv, BN) an ACBlock and its NormTail become in eval (block.fused() adds the kernels up).

    The conv has the original class and configuration and holds the fused kernel. When the block has a
    NormTail, the conv computes the block's eval output (the sum without its shift) and the BN of the
    original kind holds the shift (None with ``restore_tail=False``: the NormTail stays and keeps adding it).
    Without a NormTail the conv carries the shift as its bias. ``name``: the block's qualified name, for errors.
    """
    if block is None:
        return None, None
    kernel, bias = block.fused(f"{name}." if name else "")
    square = block.square
    keep_bias = square.bias is not None
    tail = block.tail()
    norm = None
    if tail is not None and bias is not None:
        if restore_tail:
            norm, kernel = _tail_norm(block, tail, bias, kernel)
        bias = torch.zeros_like(bias) if keep_bias else None
    template = block.template()
    if template is None:
        raise ValueError("acfx: this ACBlock does not record the conv it replaces (built by an older acfx); "
                         "use acfx.collapse on the whole model")
    ref = square.weight
    conv = refill_conv(template, kernel.to(ref.dtype), None if bias is None else bias.to(ref.dtype),
                       requires_grad=ref.requires_grad, training=block.training)
    return conv, norm
