"""The Asymmetric Convolution Block and the module left in the BatchNorm's slot."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.fx._symbolic_trace as _fx_trace

from ._modules import hollow_copy
from .geometry import Window
from .padding import crop
from .exact_impl import alternative_forward

# True inside fx.symbolic_trace (collapse's tracer); older torch only has is_fx_tracing, which export sets too.
_symbolic_tracing = getattr(_fx_trace, "is_fx_symbolic_tracing", _fx_trace.is_fx_tracing)

__all__ = ["ACBlock", "NormTail"]


class ACBlock(nn.Module):
    """k×k, 1×k and k×1 convolutions on one input, each with its own BN (if any), summed.

    Built by :func:`acfx.expand`; :func:`acfx.collapse` fuses it back into one convolution. ``pad`` is the
    padding the branches share (None when every branch conv pads by itself) and ``hor_crop`` /
    ``ver_crop`` the rows and columns each asymmetric branch removes from the shared input, so that every
    branch reads the window the k×k kernel's centre row (column) reads; ``offsets`` says where the 1×k
    (``"hor"``) and k×1 (``"ver"``) kernels sit in the k×k one, (row, column).

    ``impl`` picks how the forward is computed: ``"branches"`` (the reference, as written below),
    ``"stacked"`` (one conv, one BN, one sum: :mod:`acfx.stacked`) or ``"recompute"`` (the branches, keeping
    less for backward: :mod:`acfx.recompute`); set it with :func:`acfx.set_exact_impl`. Tracing always sees
    the branches, so that collapse finds them.
    """

    impl = "branches"

    def __init__(self, square: nn.Module, square_bn: Optional[nn.Module] = None,
                 hor: Optional[nn.Module] = None, hor_bn: Optional[nn.Module] = None,
                 ver: Optional[nn.Module] = None, ver_bn: Optional[nn.Module] = None,
                 pad: Optional[nn.Module] = None, hor_crop: Window = Window(),
                 ver_crop: Window = Window(),
                 offsets: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
        super().__init__()
        self.pad = pad
        self.square, self.square_bn = square, square_bn
        self.hor, self.hor_bn = hor, hor_bn
        self.ver, self.ver_bn = ver, ver_bn
        self.hor_crop, self.ver_crop = hor_crop, ver_crop
        self.offsets = offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl != "branches" and not _symbolic_tracing():
            other = alternative_forward(self)
            if other is not None:
                return other(self, x)
        if self.pad is not None:
            x = self.pad(x)
        out = self.square(x)
        if self.square_bn is not None:
            out = self.square_bn(out)
        if self.hor is not None:
            hor = self.hor(crop(x, self.hor_crop))
            if self.hor_bn is not None:
                hor = self.hor_bn(hor)
            out = out + hor
        if self.ver is not None:
            ver = self.ver(crop(x, self.ver_crop))
            if self.ver_bn is not None:
                ver = self.ver_bn(ver)
            out = out + ver
        return out

    def fuse(self) -> nn.Module:
        """The single conv (with bias) this block computes in eval mode.

        The hook ``timm.utils.reparameterize_model`` calls, so timm's ``--reparam`` collapses acfx models.
        A BN that expand moved into this block is folded into the conv; its slot keeps only drop/act.
        """
        from .collapse import collapse  # local: collapse imports this module
        return collapse(self)

    def extra_repr(self) -> str:
        kinds = [name for name in ("hor", "ver") if getattr(self, name) is not None]
        return f"branches={kinds}, bn_per_branch={self.square_bn is not None or self.hor_bn is not None}"


class NormTail(nn.Module):
    """What stays in a BatchNorm's slot once expand moved its normalisation into the ACB before it.

    For timm's norm-act layers that is the drop and the activation they apply after normalising; for a
    plain BN nothing (identity). It remembers the BN's class and configuration (a copy without parameters,
    kept outside the module tree) so that collapse can put back a BN of the same kind.
    """

    def __init__(self, norm: nn.Module, children: Dict[str, nn.Module]) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        # A tuple keeps the template out of named_modules(), state_dict() and .to().
        self._norm_template = (hollow_copy(norm),)

    @property
    def norm_type(self) -> type:
        return type(self._norm_template[0])

    def restore(self, params: Dict[str, torch.Tensor], training: bool,
                requires_grad: bool) -> nn.Module:
        """A BN of the original kind holding ``params`` (weight, bias, running_mean, running_var,
        num_batches_tracked), with this tail's drop/act as its children."""
        norm = hollow_copy(self._norm_template[0])
        for name in ("weight", "bias"):
            norm.register_parameter(name, nn.Parameter(params[name], requires_grad)
                                    if name in params else None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            norm.register_buffer(name, params[name])
        for name, child in self.named_children():
            norm.add_module(name, child)
        norm.train(training)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x

    def extra_repr(self) -> str:
        return f"was={self.norm_type.__name__}"
