"""How a block is fused: its branches' maps summed into one kernel, BN folding, and an ACB with its NormTail.

All of it runs in float64 (the algebra of linear_map.py on float64 tensors) and is cast back by the caller,
so that collapsing a float32 model adds no error of its own beyond one rounding. Source: Ding et al., ACNet
(ICCV 2019), Sect. 3.3.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .convs import kernel_of
from .geometry import Window
from .linear_map import ConvMap, Inexact, add
from .module_copies import refill_conv
from .norms import check_finite, fusion_dtype, norm_affine

__all__ = ["Term", "combine", "fit", "fold_into_conv", "identity_norm_params", "fuse_pair", "check_finite",
           "fusion_dtype"]


@dataclasses.dataclass(frozen=True)
class Term:
    """One summed conv(→BN) branch as a matcher resolved it: a kernel, its bias, the BN after it, where it sits."""

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


def _term_map(term: Term, size: Tuple[int, int], dtype: torch.dtype) -> ConvMap:
    weight = term.weight.detach().to(dtype)
    bias = None if term.bias is None else term.bias.detach().to(dtype)
    found = ConvMap(weight, bias)
    if term.norm is not None:
        scale, shift = norm_affine(term.norm, term.norm_name)
        found = found.then_affine(scale.to(dtype), shift.to(dtype))
    return found.embedded(size, term.offset)


def _check_result(label: str, kernel: torch.Tensor, bias: Optional[torch.Tensor],
                  tensors: Sequence[Tuple[str, str, torch.Tensor]]) -> None:
    """A fused kernel and bias must be finite; else the first non-finite of ``tensors`` ((module name, what,
    tensor): the weights they were fused from) is named, then the result (the slow path runs only on error)."""
    if bool(torch.isfinite(kernel).all()) and (bias is None or bool(torch.isfinite(bias).all())):
        return
    for name, what, tensor in tensors:
        check_finite(name, what, tensor.detach())
    check_finite(label, "fused kernel", kernel)
    check_finite(label, "fused bias", bias)


def _named_tensors(block: nn.Module, name: str) -> List[Tuple[str, str, torch.Tensor]]:
    """(module name, tensor name, tensor) of each parameter of ``block`` (at ``name`` in the model)."""
    found = []
    for path, tensor in block.named_parameters():
        module, _, what = path.rpartition(".")
        found.append((f"{name}.{module}" if name else module, what, tensor))
    return found


def combine(terms: Sequence[Term], size: Tuple[int, int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Σ over ``terms`` of their BN-folded kernels placed at their offsets in a kernel of ``size``, and the
    summed bias (None when no term has a BN or a bias), in :func:`fusion_dtype`."""
    assert terms, "combine needs at least one term"
    dtype = fusion_dtype(terms[0].weight.device)
    maps = [_term_map(term, size, dtype) for term in terms]
    kernel = maps[0].kernel
    for other in maps[1:]:
        kernel = kernel + other.kernel
    biases = [m.bias for m in maps if m.bias is not None]
    bias = None
    for b in biases:
        bias = b if bias is None else bias + b
    _check_result(terms[0].name, kernel, bias, [(t.name, "weight", t.weight) for t in terms])
    return kernel, bias


def fit(found: ConvMap, kernel_size: Tuple[int, int], window: Window) -> Union[ConvMap, Inexact]:
    """``found`` written as a map of ``kernel_size`` reading ``window`` (a conv's own geometry), if it is one."""
    if found.kernel_size == tuple(kernel_size) and found.window == window:
        return found  # already that map (adding it to a zero kernel of the same geometry would only copy it)
    target = ConvMap(found.kernel.new_zeros(found.out_channels, found.kernel.shape[1], *kernel_size), None,
                     found.stride, found.dilation, found.groups, window)
    summed = add([target, found])
    if isinstance(summed, Inexact):
        return summed
    if summed.kernel_size != tuple(kernel_size) or summed.window != window:
        return Inexact(f"the branches sum to a {summed.kernel_size} kernel reading {summed.window}, not the conv's "
                       f"{tuple(kernel_size)} reading {window}")
    return summed


def fold_into_conv(conv: nn.Module, norm: nn.Module, conv_name: str, norm_name: str
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of BN(conv(x)) as one conv, in :func:`fusion_dtype`: the kernel scaled per output channel,
    the shift plus the scaled conv bias."""
    weight = kernel_of(conv)
    dtype = fusion_dtype(weight.device)
    one_d = weight.dim() == 3  # a Conv1d: a 2-d kernel of height 1
    kernel = weight.detach().to(dtype)
    found = ConvMap(kernel.unsqueeze(2) if one_d else kernel, None if conv.bias is None else conv.bias.detach().to(dtype))
    scale, shift = norm_affine(norm, norm_name)
    folded = found.then_affine(scale.to(dtype), shift.to(dtype))
    _check_result(conv_name, folded.kernel, folded.bias, [(conv_name, "weight", weight)])
    return (folded.kernel[:, :, 0] if one_d else folded.kernel), folded.bias


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


def _tail_norm(block: nn.Module, tail: nn.Module, bias: torch.Tensor, kernel: torch.Tensor
               ) -> Tuple[nn.Module, torch.Tensor]:
    """The BN for ``tail``'s slot holding the fused shift ``bias``; the kernel to use with it."""
    template = tail._norm_template[0]
    source = block.primary_norm()
    ref = source.running_var if source is not None else block.primary_conv().weight
    params, factor = identity_norm_params(bias.to(ref.dtype).to(ref.device), template.eps, template.affine)
    params["num_batches_tracked"] = (source.num_batches_tracked.clone() if source is not None
                                     else torch.zeros((), dtype=torch.long, device=ref.device))
    requires_grad = source.weight.requires_grad if source is not None and source.affine else True
    return tail.restore(params, tail.training, requires_grad), (kernel if factor == 1.0 else kernel * factor)


def fuse_pair(block: Optional[nn.Module], restore_tail: bool = True, name: str = ""
              ) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """(conv, BN) a block and its NormTail become in eval (``block.fused()`` adds the branches up).

    The conv has the original class and configuration and holds the fused kernel. When the block has a
    NormTail, the conv computes the block's eval output (the sum without its shift) and the BN of the
    original kind holds the shift (None with ``restore_tail=False``: the NormTail stays and keeps adding it).
    Without a NormTail the conv carries the shift as its bias. ``name``: the block's qualified name, for errors.
    """
    if block is None:
        return None, None
    kernel, bias = block.fused(f"{name}." if name else "")
    _check_result(name or "the block", kernel, bias, _named_tensors(block, name))
    primary = block.primary_conv()
    keep_bias = primary.bias is not None
    tail = block.tail()
    norm = None
    if tail is not None and bias is not None:
        if restore_tail:
            norm, kernel = _tail_norm(block, tail, bias, kernel)
        bias = torch.zeros_like(bias) if keep_bias else None
    template = block.template()
    if template is None:
        raise ValueError("acfx: this block does not record the conv it replaces (built by an older acfx); "
                         "use acfx.collapse on the whole model")
    ref = primary.weight
    conv = refill_conv(template, kernel.to(ref.dtype), None if bias is None else bias.to(ref.dtype),
                       requires_grad=ref.requires_grad, training=block.training)
    return conv, norm
