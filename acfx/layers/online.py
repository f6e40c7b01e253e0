"""Online mode: a recipe's branches re-parameterised at every forward (OREPA, Hu et al., CVPR 2022).

A different training recipe from the paper's: the branches have no BN of their own but learnable
per-channel scales, their kernels are merged in weight space at every forward, and the model runs one k×k
conv per block followed by the conv's original BN. Training then costs about what the original model
costs. Collapsing is exact too: the merged kernel is the conv's weight.

Every branch kind (recipe.py) has an online form, a kernel in the k×k window times its scale: ACNet's 1×k
and k×1 kernels on their row and column, another k×k kernel, a 1×1 kernel (RepVGG's) or the identity
(each channel onto itself) on the centre tap, DBB's 1×1 → k×k as the product of the two kernels (with no
BN between them there is no bias to pad with, so the product is exact at the border too), and DBB's 1×1
→ average as the 1×1 kernel spread over the window.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .cfg_links import restore_cfg
from .layout import KIND_CODES, branch_names, conv_geometry, plan_block
from .module_copies import refill_conv
from .recorded_layout import RecordedLayout
from .split_conv import even_channel_mask, split_between_lines

__all__ = ["OnlineACConv"]


class OnlineACConv(RecordedLayout):
    """One conv whose k×k kernel is α_sq·W_sq + α_hor·W_1×k + α_ver·W_k×1 (+ the recipe's other branches, each
    its kernel times its α), merged at every forward.

    ``conv`` is the original conv (its weight is W_sq; its class and configuration, padding modes and timm's
    Conv2dSame included, define how the merged kernel is applied). The α are per output channel. ``extra``:
    the kinds of the recipe's other branches (recipe.py: "square", "point", "identity", "chain", "avg"; the
    caller checks that they apply to the conv).

    Protocol: :func:`acfx.collapse` replaces any leaf module with ``effective_weight()`` and a ``conv``
    attribute by that conv holding the effective weight.
    """

    def __init__(self, conv: nn.Conv2d, branches: str = "both", placement: str = "centre",
                 scale: float = 1.0, asym_scale: float = 1.0, extra: Sequence[str] = ()) -> None:
        super().__init__()
        self.conv = conv
        kh, kw = conv.kernel_size
        out, per_group = conv.out_channels, conv.in_channels // conv.groups
        ref = conv.weight
        self.square_scale = nn.Parameter(torch.full((out,), scale, device=ref.device, dtype=ref.dtype))
        plan = plan_block(conv_geometry(conv), branches, placement)
        hor, ver = plan.branch("hor"), plan.branch("ver")
        # (first row, rows spanned) of the 1×k kernel; (first column, columns spanned) of the k×1 kernel.
        self.rows = (hor.offset[0], hor.span[0]) if hor is not None else None
        self.cols = (ver.offset[1], ver.span[1]) if ver is not None else None
        self.hor_weight = self._new_weight((out, per_group, 1, kw)) if self.rows else None
        self.ver_weight = self._new_weight((out, per_group, kh, 1)) if self.cols else None
        self.hor_scale = self._new_scale(asym_scale) if self.rows else None
        self.ver_scale = self._new_scale(asym_scale) if self.cols else None
        # The recipe's other branches: (name, kind), their kernels' parameters named after them.
        self.extra: Tuple[Tuple[str, str], ...] = tuple(zip(branch_names(("square",) + tuple(extra))[1:], extra))
        self.tap = ((kh - 1) // 2, (kw - 1) // 2)  # where a 1×1 kernel sits (layout.py's centre tap)
        for name, kind in self.extra:
            self._add_branch(name, kind, asym_scale)
        # How the kernels add up, saved with the weights: a checkpoint trained with another placement is refused.
        self._register_layout(ref.device)
        self.training = conv.training
        for name, param in self.named_parameters():
            if not name.startswith("conv."):  # the new parameters follow the conv's weight; the conv is not touched
                param.requires_grad_(ref.requires_grad)

    def _add_branch(self, name: str, kind: str, value: float) -> None:
        conv = self.conv
        out, per_group, groups = conv.out_channels, conv.in_channels // conv.groups, conv.groups
        kh, kw = conv.kernel_size
        if kind == "square":
            self.register_parameter(name + "_weight", self._new_weight((out, per_group, kh, kw)))
        elif kind == "point":
            self.register_parameter(name + "_weight", self._new_weight((out, per_group, 1, 1)))
        elif kind == "chain":  # DBB's widths: as many channels as the input (twice as many for a depthwise conv)
            mid = conv.in_channels if groups < out else 2 * conv.in_channels
            pre = self._new_weight((mid, per_group, 1, 1))
            if mid == conv.in_channels:  # starts as the identity, as DBB's IdentityBasedConv1x1
                with torch.no_grad():
                    pre.zero_()
                    pre[torch.arange(mid), torch.arange(mid) % per_group, 0, 0] = 1
            self.register_parameter(name + "_pre_weight", pre)
            self.register_parameter(name + "_weight", self._new_weight((out, mid // groups, kh, kw)))
        elif kind == "avg":
            self.register_parameter(name + "_pre_weight", self._new_weight((out, per_group, 1, 1)))
        elif kind != "identity":
            raise ValueError(f"acfx: OnlineACConv has no online form of branch kind {kind!r}")
        self.register_parameter(name + "_scale", self._new_scale(value))

    def _branch_kernel(self, name: str, kind: str) -> torch.Tensor:
        """The k×k kernel of one of the recipe's other branches, times its scale."""
        conv = self.conv
        kh, kw = conv.kernel_size
        scale = getattr(self, name + "_scale").view(-1, 1, 1, 1)
        if kind == "square":
            return getattr(self, name + "_weight") * scale
        if kind == "chain":
            pre, outer = getattr(self, name + "_pre_weight"), getattr(self, name + "_weight")
            g = conv.groups
            inner = pre[:, :, 0, 0].reshape(g, pre.shape[0] // g, pre.shape[1])  # [g, mid/g, in/g]
            grouped = outer.reshape(g, outer.shape[0] // g, *outer.shape[1:])  # [g, out/g, mid/g, kh, kw]
            kernel = torch.einsum("gomhw,gmi->goihw", grouped, inner).reshape(outer.shape[0], pre.shape[1], kh, kw)
            return kernel * scale
        if kind == "avg":
            pre = getattr(self, name + "_pre_weight") * scale
            return pre.expand(-1, -1, kh, kw) / (kh * kw)
        if kind == "identity":
            per_group = conv.in_channels // conv.groups
            ref = self.square_scale
            eye = (torch.arange(conv.out_channels, device=ref.device) % per_group).view(-1, 1) == torch.arange(
                per_group, device=ref.device).view(1, -1)
            point = eye.to(ref.dtype).view(conv.out_channels, per_group, 1, 1) * scale
        else:  # point
            point = getattr(self, name + "_weight") * scale
        row, col = self.tap
        return F.pad(point, (col, kw - 1 - col, row, kh - 1 - row))

    def _new_weight(self, shape) -> nn.Parameter:
        ref = self.conv.weight
        weight = torch.empty(shape, device=ref.device, dtype=ref.dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        return nn.Parameter(weight)

    def _new_scale(self, value: float) -> nn.Parameter:
        ref = self.conv.weight
        return nn.Parameter(torch.full((self.conv.out_channels,), value, device=ref.device, dtype=ref.dtype))

    def _asym(self, weight: torch.Tensor, scale: torch.Tensor, line: Tuple[int, int], axis: str) -> torch.Tensor:
        first, span = line
        weight = weight * scale.view(-1, 1, 1, 1)
        if span == 2:
            weight = split_between_lines(weight, axis, even_channel_mask(self.conv.out_channels, weight))
        kh, kw = self.conv.kernel_size
        h, w = weight.shape[-2:]
        top, left = (first, 0) if axis == "rows" else (0, first)
        return F.pad(weight, (left, kw - w - left, top, kh - h - top))

    def effective_weight(self) -> torch.Tensor:
        """The merged k×k kernel: [C_out, C_in/groups, kh, kw]."""
        weight = self.conv.weight * self.square_scale.view(-1, 1, 1, 1)
        if self.hor_weight is not None:
            weight = weight + self._asym(self.hor_weight, self.hor_scale, self.rows, "rows")
        if self.ver_weight is not None:
            weight = weight + self._asym(self.ver_weight, self.ver_scale, self.cols, "cols")
        for name, kind in self.extra:
            weight = weight + self._branch_kernel(name, kind)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if type(self.conv) is nn.Conv2d:
            return self.conv._conv_forward(x, weight, self.conv.bias)
        return functional_call(self.conv, {"weight": weight}, (x,), strict=False)

    def fuse(self) -> nn.Module:
        """The conv holding the merged kernel: what this module computes, as one plain conv (timm's
        ``reparameterize_model`` calls this)."""
        conv = self.fused_conv()
        restore_cfg(self)
        return conv

    def fused_conv(self) -> nn.Module:
        """The conv holding the merged kernel (the model is not touched)."""
        with torch.no_grad():
            weight = self.effective_weight().detach().clone()
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("acfx: the merged kernel of an OnlineACConv is not finite (NaN or inf); reload a good "
                             "checkpoint before collapsing")
        bias = None if self.conv.bias is None else self.conv.bias.detach().clone()
        return refill_conv(self.conv, weight, bias)

    def layout_values(self) -> List[int]:
        """(version, first row and rows of the 1×k kernel, first column and columns of the k×1 kernel); version 2
        (a recipe's other branches) adds the centre tap and the kind of each other branch, in order."""
        values = [1 if not self.extra else 2, *(self.rows or (-1, 0)), *(self.cols or (-1, 0))]
        if self.extra:
            values += [*self.tap, *(KIND_CODES[kind] for _, kind in self.extra)]
        return values

    def layout_problem(self, saved: torch.Tensor) -> Optional[str]:
        saved_values, own = saved.flatten().tolist(), self.layout_values()
        if saved_values == own:
            return None
        if saved_values[5:] != own[5:] or saved_values[:1] != own[:1]:
            kinds = {code: kind for kind, code in KIND_CODES.items()}
            describe = lambda values: [kinds.get(v, "?") for v in values[7:]]  # noqa: E731
            return (f"the checkpoint's online block has the other branches {describe(saved_values)}, this one "
                    f"{describe(own)}: expand with the recipe (and kxk_branches) the checkpoint was trained with")
        return (f"the checkpoint's asymmetric kernels sit elsewhere (rows, cols {saved_values[1:5]} in the checkpoint "
                f"vs {own[1:5]} here): expand with the placement / branches the checkpoint was trained with")

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.conv.bias

    def extra_repr(self) -> str:
        kinds = [n for n, w in (("hor", self.hor_weight), ("ver", self.ver_weight)) if w is not None]
        return f"online re-parameterisation, branches={kinds + [name for name, _ in self.extra]}"
